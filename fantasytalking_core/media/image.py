"""The reference portrait: reading any image file, and the model's frame size.

Sizing follows the official pipeline: the longest edge becomes ``image_size`` with the aspect kept, then both
sides are rounded up to multiples of 16 (the VAE's 8x and the DiT's 2x2 patches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageInputError

SIZE_MULTIPLE = 16


def frame_size(width: int, height: int, image_size: int = 512) -> tuple[int, int]:
    """(width, height) of the video for a ``width`` x ``height`` reference: longest edge ``image_size``, aspect
    kept, each side rounded up to a multiple of 16 (pixels)."""
    if width < 1 or height < 1:
        raise ImageInputError(f"image has no pixels ({width}x{height}).")
    if image_size < SIZE_MULTIPLE:
        raise ImageInputError(f"image_size must be at least {SIZE_MULTIPLE}, got {image_size}.")
    scale = image_size / max(width, height)
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return (-(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16/32-bit and float images rescaled, palettes expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8))  # mode L
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, upright as viewers show it (a phone photo's EXIF orientation applied, as
    ComfyUI's Load Image does), with a clear error for a missing, non-image or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path} is a folder, not an image file." if path.is_dir() else f"Image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:  # Pillow refuses images this large as a possible attack
        raise ImageInputError(f"{path} is too large to open ({exc}); downscale it.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageInputError(f"{path} is not a readable image ({exc}). Use a PNG, JPEG or WebP portrait.") from None


def image_to_tensor(image: Image.Image, image_size: int = 512) -> torch.Tensor:
    """Resize to the video frame size and convert: [3, H, W] float32 in -1..1.

    As the official code: Lanczos to the longest edge (``int`` sizes), then bicubic to the multiples of 16.
    """
    scale = image_size / max(image.size)
    scaled = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.LANCZOS)
    width, height = frame_size(*image.size, image_size=image_size)
    resized = scaled if scaled.size == (width, height) else scaled.resize((width, height), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())  # [H, W, 3] in 0..255
    return array.permute(2, 0, 1) * (2 / 255) - 1


def comfy_image_to_pil(image: torch.Tensor) -> Image.Image:
    """A ComfyUI IMAGE [B, H, W, C] (0..1, first of the batch) or [H, W, C] -> PIL RGB."""
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"expected an IMAGE of shape [B, H, W, 3], got {tuple(image.shape)}.")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return to_rgb(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))  # L, RGB or RGBA
