"""The composed pipeline on tiny random models: shapes, determinism, motion defaults bit for bit."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from PIL import Image

from fantasytalking_core.face.motion import MotionIntensity
from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.pipeline import FantasyTalkingPipeline, GenerationSettings
from fantasytalking_core.tiny import make_tiny_models


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    files = make_tiny_models(tmp_path_factory.mktemp("models"))
    return FantasyTalkingPipeline(load_models(files, compute_dtype=torch.float32))


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
    # the recording itself (44.1 kHz stereo), not the 16 kHz mono copy the model hears
    assert result.sample_rate == 44100 and result.audio.shape == (2, int(0.4 * 44100))
    assert torch.equal(result.audio, voice["waveform"][0])


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


def test_interrupt_from_progress_stops_the_run_and_sends_every_model_home(pipe, face, voice, monkeypatch):
    """Records each model's moves: every part goes to the compute device and back, also when the run is cut."""
    moves = []
    for name in ("dit", "vae", "text_encoder", "image_encoder", "wav2vec2"):
        module = getattr(pipe.models, name)
        original = module.to

        def recording_to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", recording_to)
    monkeypatch.setattr(pipe, "device", torch.device("cpu", 0))  # same memory, but "cpu:0" tells a move from a return

    def stop(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe(face, voice, GenerationSettings(steps=3, image_size=32), progress=stop)
    assert {n for n, d in moves if d == "cpu:0"} == {"dit", "vae", "text_encoder", "image_encoder", "wav2vec2"}
    for name in ("dit", "vae", "text_encoder", "image_encoder", "wav2vec2"):
        mine = [d for n, d in moves if n == name]
        assert mine[-1] == "cpu", f"{name} was left on {mine[-1]}"


def test_face_crop_generates_on_the_face_and_pastes_back_at_full_size(pipe, voice):
    from skimage import data

    from fantasytalking_core.face.crop import detect_faces, pick_face, square_crop
    from fantasytalking_core.face.workflow import FaceCropOptions, generate_talking_video

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
    from fantasytalking_core.face.workflow import FaceCropOptions, generate_talking_video

    settings = GenerationSettings(steps=1, image_size=32, seed=5)
    with pytest.raises(FaceNotFoundError, match="No face was found"):
        generate_talking_video(pipe, face, voice, settings, FaceCropOptions())
    out = generate_talking_video(pipe, face, voice, settings, FaceCropOptions(fallback_whole_image=True))
    assert torch.equal(out.frames, pipe(face, voice, settings).frames)


def test_bf16_models_run_the_whole_pipeline(tmp_path_factory, face, voice):
    """Half-precision weights (as on a GPU): every part loads in bf16, and the frames stay close to float32's."""
    files = make_tiny_models(tmp_path_factory.mktemp("bf16"))
    bf16 = FantasyTalkingPipeline(load_models(files, compute_dtype=torch.bfloat16))
    assert bf16.models.dit.dtype == torch.bfloat16 and bf16.models.text_encoder.dtype == torch.bfloat16
    settings = GenerationSettings(steps=2, image_size=32, seed=5, motion=MotionIntensity(face=0.8), batch_passes=True)
    low = bf16(face, voice, settings).frames
    full = FantasyTalkingPipeline(load_models(files, compute_dtype=torch.float32))(face, voice, settings).frames
    assert torch.isfinite(low).all() and low.shape == full.shape
    assert (low - full).abs().mean() < 0.05


def test_defaults_compute_in_bf16_whatever_the_files_store(tmp_path):
    """The official precision by default: the DiT, the adapter's k/v and umT5 in bf16 even from fp16 or fp32
    files; CLIP and wav2vec2 in float32. A half-precision file must not turn into half-precision compute."""
    files = make_tiny_models(tmp_path)
    dit_file = next(files.dit.glob("*.safetensors"))
    save_file({k: v.half() for k, v in load_file(dit_file).items()}, dit_file)  # a user's ..._fp16 file
    for stored in (torch.float16, torch.float32):
        if stored == torch.float32:
            save_file({k: v.float() for k, v in load_file(dit_file).items()}, dit_file)  # the official fp32 shards
        models = load_models(files)
        block = models.dit.transformer.blocks[0]
        assert models.dit.dtype == torch.bfloat16, stored
        assert block.attn1.to_q.weight.dtype == block.attn2.processor.audio.k_proj.weight.dtype == torch.bfloat16
        assert models.text_encoder.dtype == torch.bfloat16
        assert models.image_encoder.dtype == torch.float32 and models.wav2vec2.dtype == torch.float32


def test_bad_settings_fail_at_once_with_a_clear_error():
    from fantasytalking_core.errors import SettingsError

    for bad in ({"steps": 0}, {"audio_guidance_range": (0.8, 0.2)}, {"shift": 0}, {"vae_tile": 100}, {"max_frames": 80}):
        with pytest.raises(SettingsError):
            GenerationSettings(**bad)
    with pytest.raises(SettingsError, match="face intensity"):
        MotionIntensity(face=2.0)


def test_streamed_dit_makes_the_same_video(pipe, face, voice):
    """--offload-blocks: the DiT's blocks stream in one at a time; the frames are those of the resident DiT."""
    settings = GenerationSettings(steps=2, image_size=32, seed=5)
    streamed = FantasyTalkingPipeline(pipe.models, pipe.device, dit_placement="streamed")
    assert torch.equal(streamed(face, voice, settings).frames, pipe(face, voice, settings).frames)
    from fantasytalking_core.errors import SettingsError

    with pytest.raises(SettingsError, match="dit_placement"):
        FantasyTalkingPipeline(pipe.models, pipe.device, dit_placement="gpu")


def test_loras_are_refused_on_sharded_weights_not_dropped(pipe, face, voice, tmp_path):
    from types import SimpleNamespace

    from fantasytalking_core.errors import SettingsError
    from fantasytalking_core.loaders.lora import WanLora

    # a parallel run whose DiT weights are sharded (FSDP) places the DiT without dit_on_device, where LoRAs apply
    from fantasytalking_core.runtime.parallel import ParallelLayout

    sharded = SimpleNamespace(layout=ParallelLayout(ulysses=2, fsdp=True), weights_sharded=True, map_passes=None,
                              prepare=lambda transformer: None)
    lora = WanLora("style", {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, 1.0)
    models = type(pipe.models)(**{**pipe.models.__dict__, "dit": pipe.models.dit.with_loras([lora])})
    with pytest.raises(SettingsError, match="LoRAs are not applied to weights sharded"):
        run(FantasyTalkingPipeline(models, parallel=sharded), face, voice)
