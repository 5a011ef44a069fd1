"""Face detection on a real photograph (scikit-image's astronaut), square crops and feathered paste-back."""

import pytest
import torch
import numpy as np
from skimage import data

from fantasytalking_core.errors import FaceNotFoundError
from fantasytalking_core.face.crop import (CropInfo, FaceBox, box_from_mask, crop_image, detect_faces, feather_mask,
                                           paste_back, pick_face, square_crop)


@pytest.fixture(scope="module")
def astronaut():
    return torch.from_numpy(data.astronaut()).float() / 255  # [512, 512, 3], one face near (220, 123)


def test_detects_the_face_in_a_real_photo(astronaut):
    faces = detect_faces(astronaut)
    face = pick_face(faces)
    assert face.x0 < 220 < face.x1 and face.y0 < 123 < face.y1
    assert 60 < face.x1 - face.x0 < 130
    assert all(f.score >= 0.5 for f in faces)


def test_finds_a_face_turned_well_away_from_the_camera():
    from fantasytalking_core.face.crop import _detect, import_dlib

    # scikit-image's cameraman: his face seen at about three-quarters, looking into the viewfinder (nose at about
    # (245, 160), left ear at about (200, 140)); the frontal HOG detector finds nothing, even upsampled twice
    photo = np.ascontiguousarray(np.repeat(data.camera()[..., None], 3, axis=2))
    assert _detect(import_dlib().get_frontal_face_detector(), photo, 2, 0.0, 1.0) == []
    face = pick_face(detect_faces(photo))
    assert face.x0 < 225 < face.x1 and face.y0 < 150 < face.y1  # the middle of his face
    assert 40 < face.x1 - face.x0 < 120 and face.y1 < 230  # face-sized, not the whole figure


def test_no_face_and_bad_index_are_clear_errors(astronaut):
    with pytest.raises(FaceNotFoundError, match="No face was found in the reference image. Use a clear, frontal"):
        pick_face(detect_faces(torch.full((200, 200, 3), 0.5)))
    with pytest.raises(FaceNotFoundError, match="No face was found in the reference image. Paint it"):
        pick_face([], remedy="Paint it.")  # each caller names its own options
    with pytest.raises(FaceNotFoundError, match="only 1 face"):
        pick_face([FaceBox(0, 0, 10, 10)], index=1)


def test_mask_gives_its_bounding_box():
    mask = torch.zeros(1, 50, 80)
    mask[0, 10:20, 30:45] = 1
    assert box_from_mask(mask).as_tuple() == (30.0, 10.0, 45.0, 20.0)
    with pytest.raises(FaceNotFoundError, match="mask is empty"):
        box_from_mask(torch.zeros(50, 80))


@pytest.mark.parametrize("height,width", [(512, 512), (300, 800), (900, 400)])
def test_square_crop_is_centred_inside_and_keeps_the_face(height, width):
    face = FaceBox(100, 120, 160, 200)  # 60 x 80
    info = square_crop(face, height, width, margin=0.5)
    assert info.size == 160  # 80 * (1 + 2 * 0.5)
    assert 0 <= info.x <= width - info.size and 0 <= info.y <= height - info.size
    f = info.face
    assert (f.x1 - f.x0, f.y1 - f.y0) == (60, 80) and f.x0 >= 0 and f.y0 >= 0 and f.x1 <= 160 and f.y1 <= 160
    assert abs((f.x0 + f.x1) / 2 - 80) <= 1 and abs((f.y0 + f.y1) / 2 - 80) <= 1  # centred when there is room
    assert info.face_in(320, 320) == (f.x0 * 2, f.y0 * 2, f.x1 * 2, f.y1 * 2)


def test_crop_near_the_border_shifts_inside_and_is_never_larger_than_the_image():
    info = square_crop(FaceBox(0, 0, 40, 40), 100, 300, margin=2.0)
    assert (info.x, info.y, info.size) == (0, 0, 100)
    image = torch.rand(100, 300, 3)
    assert torch.equal(crop_image(image, info), image[:, :100])


def test_crop_outside_the_image_is_edge_padded():
    image = torch.arange(16.0).view(4, 4, 1).expand(4, 4, 3)
    out = crop_image(image, CropInfo(-1, -1, 3, 4, 4, FaceBox(0, 0, 1, 1)))
    assert out[:, :, 0].tolist() == [[0, 0, 1], [0, 0, 1], [4, 4, 5]]


def test_feather_ramps_only_on_inner_sides():
    m = feather_mask(8, 2, (True, False, False, False))
    assert m[:, 0].tolist() == [0.25] * 8 and m[:, 1].tolist() == [0.75] * 8 and m[:, 2:].eq(1).all()
    assert feather_mask(8, 0).eq(1).all()


def test_paste_back_round_trip_and_blend(astronaut):
    info = square_crop(pick_face(detect_faces(astronaut)), 512, 512)
    crop = crop_image(astronaut, info)
    same = paste_back(crop[None].expand(2, -1, -1, -1), astronaut, info, feather=12)
    torch.testing.assert_close(same, astronaut[None].expand(2, -1, -1, -1), rtol=0, atol=1e-5)

    red = torch.zeros(1, 64, 64, 3)
    red[..., 0] = 1
    out = paste_back(red, astronaut, info, feather=12)[0]
    centre = out[info.y + 20: info.y + info.size - 20, info.x + 20: info.x + info.size - 20]
    assert torch.allclose(centre, torch.tensor([1.0, 0, 0]).expand_as(centre), atol=1e-4)
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[info.y: info.y + info.size, info.x: info.x + info.size] = False
    assert torch.equal(out[outside], astronaut[outside])
    edge = out[info.y + info.size // 2, info.x + 3]  # inside the feather: a blend of both
    assert 0 < edge[1] < 1 and edge[0] > astronaut[info.y + info.size // 2, info.x + 3, 0] - 1e-6


def test_without_dlib_face_detection_says_what_to_install(monkeypatch):
    """dlib-bin has no wheel for Windows on ARM: the requirement is left out there and the feature says so."""
    from fantasytalking_core.errors import MissingDependencyError

    monkeypatch.setitem(__import__("sys").modules, "dlib", None)  # import dlib -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install dlib-bin.*Everything else works without it"):
        detect_faces(torch.full((64, 64, 3), 0.5))


def _resized(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    from PIL import Image as PILImage

    pil = PILImage.fromarray((image.numpy() * 255).round().astype("uint8")).resize((width, height), PILImage.BILINEAR)
    return torch.from_numpy(__import__("numpy").asarray(pil)).float() / 255


@pytest.mark.parametrize("width, height", [(1024, 512), (512, 1024)])
def test_a_face_in_a_photo_stretched_by_a_non_uniform_resize_is_found(astronaut, width, height):
    """HOG alone finds nothing in the astronaut stretched 2:1 either way; the box comes back in the stretched image."""
    face = pick_face(detect_faces(_resized(astronaut, width, height)))
    sx, sy = width / 512, height / 512
    assert face.x0 < 220 * sx < face.x1 and face.y0 < 123 * sy < face.y1


def test_a_small_face_in_a_large_photo_is_found(astronaut):
    """The astronaut at 128 px inside a 1536 px canvas: a face of ~25 px, below HOG's size at one doubling."""
    canvas = torch.full((1536, 1536, 3), 0.5)
    canvas[600:728, 700:828] = _resized(astronaut, 128, 128)
    face = pick_face(detect_faces(canvas))
    assert face.x0 < 700 + 220 / 4 < face.x1 and face.y0 < 600 + 123 / 4 < face.y1


@pytest.mark.parametrize("height, width", [(1, 1), (16, 5000), (3, 3)])
def test_a_tiny_or_very_flat_picture_has_no_face_instead_of_a_dlib_error(height, width):
    """The last resort, dlib's CNN, searches a copy at most 640 px long: 16x5000 becomes 2x640, under the CNN's
    filter, which dlib refuses with a multi-line C++ error; such a picture simply has no face."""
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert detect_faces(pixels) == []
