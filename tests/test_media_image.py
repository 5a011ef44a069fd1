import numpy as np
import pytest
import torch
from PIL import Image

from fantasytalking_core.errors import ImageInputError
from fantasytalking_core.media.image import comfy_image_to_pil, frame_size, image_to_tensor, load_image


@pytest.mark.parametrize("size,expected", [((1024, 768), (512, 384)), ((768, 1024), (384, 512)),
                                           ((1000, 563), (512, 288)), ((300, 300), (512, 512)), ((4000, 100), (512, 16))])
def test_frame_size_keeps_aspect_and_multiples_of_16(size, expected):
    w, h = frame_size(*size)
    assert (w, h) == expected and w % 16 == 0 and h % 16 == 0


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "LA", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (60, 40)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(rgb.convert("L")).astype(int)).max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_tensor_range_and_shape():
    t = image_to_tensor(Image.new("RGB", (100, 50), (255, 0, 0)), image_size=64)
    assert t.shape == (3, 32, 64)
    assert torch.allclose(t[0], torch.ones_like(t[0])) and torch.allclose(t[1], -torch.ones_like(t[1]))


def test_bad_files_and_shapes(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "a.png").write_text("hello")
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_image(tmp_path / "a.png")
    with pytest.raises(ImageInputError, match=r"\[B, H, W, 3\]"):
        comfy_image_to_pil(torch.zeros(1, 3, 32, 32))


def test_resize_is_lanczos_to_the_edge_then_bicubic_to_multiples_of_16():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    official = image.resize((307, 184), Image.LANCZOS).resize((320, 192), Image.BICUBIC)  # 500x300 -> 307x184 -> 320x192
    ours = image_to_tensor(image, image_size=307)
    assert ours.shape == (3, 192, 320)
    expected = torch.from_numpy(np.asarray(official, dtype=np.float32)).permute(2, 0, 1) * (2 / 255) - 1
    assert torch.equal(ours, expected)


def test_a_phone_photo_is_read_upright(tmp_path):
    """EXIF orientation 6 (the camera was turned: view rotated 90 degrees clockwise), as ComfyUI's Load Image reads it."""
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # 60 wide, 40 high as stored
    stored[:, :10] = 255  # a white band on the stored left edge: the top once turned upright
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert upright.shape == (60, 40, 3)
    assert upright[:10].mean() > 200 and upright[20:].mean() < 50
