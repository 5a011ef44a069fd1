"""Face crop -> identity -> paste-back as the nodes do it (plain functions, no ComfyUI)."""

import pytest
import torch
from skimage import data

from fantasytalking_core.errors import FaceNotFoundError
from nodes.convert import FaceCrop, check_identity, crop_face, encode_identity, paste_face
from test_nodes_convert import CLIPVisionOutput, ComfyLikeVAE


@pytest.fixture(scope="module")
def photo():
    return torch.from_numpy(data.astronaut()).float()[None] / 255  # IMAGE [1, 512, 512, 3]


def test_crop_is_square_around_the_face_and_pastes_back(photo):
    face_image, crop = crop_face(photo, margin=0.5)
    side = crop.info.size
    assert face_image.shape == (1, side, side, 3) and 120 < side < 300
    f = crop.info.face
    assert f.x0 >= 0 and f.y0 >= 0 and f.x1 <= side and f.y1 <= side
    frames = torch.zeros(3, 64, 64, 3)  # "generated" black frames at the model's size
    out = paste_face(frames, crop, feather=8)
    assert out.shape == (3, 512, 512, 3)
    i = crop.info
    assert out[:, i.y + side // 2, i.x + side // 2].abs().max() == 0  # centre: the generated pixels
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[i.y: i.y + side, i.x: i.x + side] = False
    assert torch.equal(out[:, outside], photo[0][outside].expand(3, -1, -1))  # everything outside the square untouched


def test_mask_replaces_detection(photo):
    mask = torch.zeros(1, 512, 512)
    mask[0, 300:340, 100:180] = 1
    _, crop = crop_face(photo, mask=mask, margin=0.0)
    assert crop.info.size == 80 and (crop.info.face.x1 - crop.info.face.x0, crop.info.face.y1 - crop.info.face.y0) == (80, 40)


def test_no_face_stops_or_falls_back_to_the_whole_image():
    grey = torch.full((1, 64, 96, 3), 0.5)
    with pytest.raises(FaceNotFoundError, match="No face was found") as refused:
        crop_face(grey)
    # what this node offers (its mask input, its fallback switch), not the command line's face box
    assert "mask" in str(refused.value) and "fallback_whole_image" in str(refused.value)
    assert "face box" not in str(refused.value) and "--face" not in str(refused.value)
    image, crop = crop_face(grey, fallback_whole_image=True)
    assert torch.equal(image, grey) and crop.info is None
    frames = torch.rand(2, 32, 48, 3)
    assert torch.equal(paste_face(frames, crop), frames)


def test_identity_gets_the_face_region_from_the_crop_or_by_detection(photo):
    clip = CLIPVisionOutput(penultimate_hidden_states=torch.randn(1, 257, 8))
    face_image, crop = crop_face(photo)
    identity = encode_identity(face_image, ComfyLikeVAE(None), clip, 64, crop)
    assert identity.frame_size == (64, 64)
    assert identity.face_box == pytest.approx(crop.info.face_in(64, 64))
    assert identity.crop is crop  # the sampler pastes a video it writes to a file back into the portrait
    found = encode_identity(photo, ComfyLikeVAE(None), clip, 256, locate_face=True)
    assert found.crop is None
    x0, y0, x1, y1 = found.face_box  # the astronaut's face, in 256x256 frame pixels
    assert x0 < 110 < x1 and y0 < 62 < y1
    assert encode_identity(photo, ComfyLikeVAE(None), clip, 256).face_box is None
    assert isinstance(crop, FaceCrop)


def test_a_mask_of_another_size_is_refused(photo):
    from fantasytalking_core.errors import ImageInputError

    with pytest.raises(ImageInputError, match="paint the mask on this image"):
        crop_face(photo, mask=torch.ones(1, 100, 100))


def test_identity_check_reports_no_face_instead_of_failing_the_job(photo):
    # a graph where Identity Check runs before Save Video lost the finished video when the check raised
    grey = torch.full((3, 64, 64, 3), 0.5)
    mean, minimum, text = check_identity(photo, grey, every_nth_frame=1)
    assert (mean, minimum) == (None, None) and "no score" in text and "No face was found in any output frame" in text
    mean, minimum, text = check_identity(grey[:1], photo, every_nth_frame=1)  # no face in the reference either
    assert (mean, minimum) == (None, None) and "no score" in text
    mean, minimum, text = check_identity(photo, torch.cat([photo, torch.full_like(photo, 0.5)]), every_nth_frame=1)
    assert mean == pytest.approx(1.0, abs=1e-4) and minimum == pytest.approx(1.0, abs=1e-4)
    assert text.startswith("identity similarity: mean 1.000") and "1 without a detectable face" in text


def test_identity_check_keeps_no_video_between_runs(photo):
    # it was once memoised on the tensors: every checked video stayed in RAM, and a tensor changed in place got
    # the old answer
    import gc
    import weakref

    frames = photo.clone()
    assert check_identity(photo, frames, every_nth_frame=1)[0] == pytest.approx(1.0, abs=1e-4)
    frames.copy_(photo.flip(2))  # the same tensor, another video: the mirrored face
    assert check_identity(photo, frames, every_nth_frame=1)[0] < 0.999
    gone = weakref.ref(frames)
    del frames
    gc.collect()
    assert gone() is None


def test_identity_check_shows_progress_and_stops_when_cancelled(photo):
    # a frame without a face takes seconds on a CPU: the node's bar moves per checked frame, and Cancel stops it
    calls = []
    frames = torch.cat([photo, photo, photo])
    check_identity(photo, frames, every_nth_frame=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        check_identity(photo, frames, every_nth_frame=1, progress=cancel)


def test_identity_check_without_dlib_gives_no_score_instead_of_failing_the_job(photo, monkeypatch):
    from fantasytalking_core.errors import MissingDependencyError
    from fantasytalking_core.face import identity

    def no_dlib():
        raise MissingDependencyError("Face detection needs dlib (pip install dlib).")

    monkeypatch.setattr(identity, "import_dlib", no_dlib)
    mean, minimum, text = check_identity(photo, photo, every_nth_frame=1)
    assert (mean, minimum) == (None, None)
    assert text == "identity check: no score: Face detection needs dlib (pip install dlib)."
