"""The composed pipeline on tiny random models: shapes, determinism, motion defaults bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from fantasytalking_core.model_paths import load_models
from fantasytalking_core.motion import MotionIntensity
from fantasytalking_core.pipeline import FantasyTalkingPipeline, GenerationSettings
from fantasytalking_core.tiny import make_tiny_models


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    files = make_tiny_models(tmp_path_factory.mktemp("models"))
    return FantasyTalkingPipeline(load_models(files, dtype=torch.float32))


@pytest.fixture(scope="module")
def voice():
    t = torch.arange(int(0.4 * 44100)) / 44100
    return {"waveform": (0.3 * torch.sin(2 * torch.pi * 220 * t)).view(1, 1, -1).repeat(1, 2, 1), "sample_rate": 44100}


@pytest.fixture(scope="module")
def face():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 64, 3), dtype=np.uint8))


def run(pipe, face, voice, **kw):
    settings = GenerationSettings(steps=2, image_size=32, seed=5, **kw)
    return pipe(face, voice, settings)


def test_frames_audio_and_progress(pipe, face, voice):
    calls = []
    settings = GenerationSettings(steps=2, image_size=32, seed=5)
    result = pipe(face, voice, settings, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]
    assert result.frames.shape == (13, 32, 32, 3)  # 0.4 s at 23 fps -> 4*floor(9.2/4)+5; 64x40 -> 32x(20->32)
    assert 0 <= result.frames.min() and result.frames.max() <= 1 and result.frames.std() > 0
    assert result.sample_rate == 16000 and result.audio.shape == (1, int(0.4 * 16000))


def test_same_seed_same_video_other_seed_other_video(pipe, face, voice):
    a, b = run(pipe, face, voice), run(pipe, face, voice)
    assert torch.equal(a.frames, b.frames)
    settings = GenerationSettings(steps=2, image_size=32, seed=6)
    assert not torch.equal(a.frames, pipe(face, voice, settings).frames)


def test_default_motion_is_the_official_path_bit_for_bit(pipe, face, voice):
    plain = run(pipe, face, voice)
    default = run(pipe, face, voice, motion=MotionIntensity(), face_box=(0, 0, 16, 16))
    assert torch.equal(plain.frames, default.frames)
    changed = run(pipe, face, voice, motion=MotionIntensity(face=1.0, body=0.0), face_box=(0, 0, 16, 16))
    assert not torch.equal(plain.frames, changed.frames)


def test_interrupt_from_progress_stops_the_run_and_leaves_models_home(pipe, face, voice):
    def stop(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe(face, voice, GenerationSettings(steps=3, image_size=32), progress=stop)
    assert next(pipe.models.dit.parameters()).device.type == "cpu"


def test_face_crop_generates_on_the_face_and_pastes_back_at_full_size(pipe, voice):
    from skimage import data

    from fantasytalking_core.face_crop import detect_faces, pick_face, square_crop
    from fantasytalking_core.pipeline import FaceCropOptions, generate_talking_video

    photo = Image.fromarray(data.astronaut())
    result = generate_talking_video(pipe, photo, voice, GenerationSettings(steps=1, image_size=32, seed=5),
                                    FaceCropOptions(feather=4))
    assert result.frames.shape == (13, 512, 512, 3)
    ref = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255)
    info = square_crop(pick_face(detect_faces(ref)), 512, 512)
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[info.y: info.y + info.size, info.x: info.x + info.size] = False
    assert torch.equal(result.frames[5][outside], ref[outside])  # untouched outside the crop
    inside = result.frames[5, info.y + 10: info.y + info.size - 10, info.x + 10: info.x + info.size - 10]
    assert not torch.allclose(inside, ref[info.y + 10: info.y + info.size - 10, info.x + 10: info.x + info.size - 10])


def test_face_crop_without_a_face_fails_clearly_or_falls_back(pipe, face, voice):
    from fantasytalking_core.errors import FaceNotFoundError
    from fantasytalking_core.pipeline import FaceCropOptions, generate_talking_video

    settings = GenerationSettings(steps=1, image_size=32, seed=5)
    with pytest.raises(FaceNotFoundError, match="No face was found"):
        generate_talking_video(pipe, face, voice, settings, FaceCropOptions())
    out = generate_talking_video(pipe, face, voice, settings, FaceCropOptions(fallback_whole_image=True))
    assert torch.equal(out.frames, pipe(face, voice, settings).frames)
