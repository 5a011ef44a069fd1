"""Face detection, square face crops and feathered paste-back (crop -> generate -> paste back).

The paper's face-focused identity attention is not in the public release. What helps identity and lip detail
without training is resolution: a small face in a large photo is cropped to a square around it, the model
generates at its full resolution on the crop, and the result is pasted back into the full-resolution reference,
frame by frame, with a feathered edge. :class:`CropInfo` carries everything the paste-back needs.

Detection uses dlib's HOG frontal-face detector (its weights are compiled into the ``dlib-bin`` package), and when
that finds nothing, dlib's CNN (MMOD) detector, whose weights ship in ``face-recognition-models``: it also finds
faces turned well away from the camera. Nothing is downloaded. A user-given box or mask can replace detection.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F

from ..errors import FaceNotFoundError, ImageInputError, MissingDependencyError, ModelNotFoundError, SettingsError

DEFAULT_MARGIN = 0.6  # extra side length around the face box, as a fraction of the face size on each side
DETECTION_THRESHOLD = 0.5  # dlib HOG score below which a detection is ignored (weak, often not a face)


@dataclass(frozen=True)
class FaceBox:
    """A face in pixels of the image it was found in: x0, y0 inclusive, x1, y1 exclusive; score from the detector."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def scaled(self, sx: float, sy: float) -> FaceBox:
        """The same face in an image resized by ``sx`` horizontally and ``sy`` vertically."""
        return FaceBox(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy, self.score)


@dataclass(frozen=True)
class CropInfo:
    """Where a square crop came from: top-left (x, y) and side ``size`` in original pixels (the square may reach
    outside the image, which is then padded by edge replication), the original size, and the face in crop pixels."""

    x: int
    y: int
    size: int
    image_height: int
    image_width: int
    face: FaceBox

    def face_in(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The face box in pixels of a ``width`` x ``height`` frame generated from this crop."""
        sx, sy = width / self.size, height / self.size
        return (self.face.x0 * sx, self.face.y0 * sy, self.face.x1 * sx, self.face.y1 * sy)


def _as_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H, W, 3] float 0..1 tensor or uint8 array -> contiguous uint8 array."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImageInputError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}.")
    return np.ascontiguousarray(image, dtype=np.uint8)


def import_dlib():
    """dlib, or a clear error where it is not installed (dlib-bin has no wheel for Windows on ARM)."""
    try:
        import dlib
    except ImportError:
        raise MissingDependencyError(
            "Face detection needs dlib, which is not installed (dlib-bin has no wheel for Windows on ARM): "
            "pip install dlib-bin, or build dlib from source; or give the face yourself (a mask, a face box), "
            "or leave face crop and motion intensity off. Everything else works without it.") from None
    return dlib


INSTALL_HINT = "pip install face-recognition-models dlib-bin"


def face_model_dir() -> Path:
    """The folder of dlib's shipped face models (``face-recognition-models``: the CNN detector, landmarks, the
    face-recognition ResNet); nothing is downloaded."""
    # find_spec does not run the package's __init__ (which needs the deprecated pkg_resources)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"Face detection and the identity check need dlib's face models: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "models"


# Width scales that undo a non-uniform resize (a photo stretched 2:1 or 3:2, either way): HOG only finds faces of
# natural proportions, so when a plain pass finds none the image is unstretched, searched, and the boxes mapped back.
UNSTRETCH = (0.5, 2.0, 2 / 3, 1.5)


def detect_faces(image: torch.Tensor | np.ndarray, upsample: int = 1,
                 threshold: float = DETECTION_THRESHOLD) -> list[FaceBox]:
    """Frontal faces in ``image`` ([H, W, 3], float 0..1 or uint8), largest first, in ``image``'s pixels.

    Run it on the full-resolution picture. ``upsample`` doubles the image that many times first (faces down to
    ~40 pixels at 1). When nothing is found: the picture is searched again unstretched (``UNSTRETCH``), then with
    one more doubling for small faces in a large photo (a few seconds for 4 megapixels), and last by dlib's CNN
    detector (:func:`_detect_cnn`), which also finds faces turned well away from the camera (HOG looks for
    frontal ones).
    """
    detector = import_dlib().get_frontal_face_detector()
    pixels = _as_uint8(image)
    faces = _detect(detector, pixels, upsample, threshold, 1.0)
    height, width = pixels.shape[:2]
    for width_scale in UNSTRETCH:
        if faces:
            return faces
        unstretched = np.asarray(Image.fromarray(pixels).resize((max(1, round(width * width_scale)), height),
                                                                Image.BILINEAR))
        faces = _detect(detector, unstretched, upsample, threshold, width_scale)
    return faces or _detect(detector, pixels, upsample + 1, threshold, 1.0) or _detect_cnn(pixels)


CNN_SIDE = 640  # the CNN searches a copy with this longest side, doubled once: faces down to ~40 px of that copy
CNN_MIN_SIDE = 20  # a copy narrower than this holds no face it could find (dlib refuses copies under 4 px)


def _detect_cnn(pixels: np.ndarray) -> list[FaceBox]:
    """dlib's MMOD CNN face detector (shipped in ``face-recognition-models``): turned and profile-ish faces that
    the HOG detector misses. Seconds per picture on a CPU, so it runs last, on a copy at most ``CNN_SIDE`` wide."""
    dlib = import_dlib()
    detector = dlib.cnn_face_detection_model_v1(str(face_model_dir() / "mmod_human_face_detector.dat"))
    height, width = pixels.shape[:2]
    scale = min(1.0, CNN_SIDE / max(height, width))
    small = pixels if scale == 1.0 else np.asarray(
        Image.fromarray(pixels).resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR))
    if min(small.shape[:2]) < CNN_MIN_SIDE:  # a tiny or very flat picture: nothing to find
        return []
    found = detector(np.ascontiguousarray(small), 1)
    faces = [FaceBox(d.rect.left() / scale, d.rect.top() / scale, (d.rect.right() + 1) / scale,
                     (d.rect.bottom() + 1) / scale, d.confidence) for d in found]
    return sorted(faces, key=lambda f: (f.area, f.score), reverse=True)


def _detect(detector, pixels: np.ndarray, upsample: int, threshold: float, width_scale: float) -> list[FaceBox]:
    """One HOG pass; boxes mapped back from an image whose width was scaled by ``width_scale``."""
    boxes, scores, _ = detector.run(pixels, upsample, threshold)
    faces = [FaceBox(b.left() / width_scale, b.top(), (b.right() + 1) / width_scale, b.bottom() + 1, s)
             for b, s in zip(boxes, scores)]
    return sorted(faces, key=lambda f: (f.area, f.score), reverse=True)


def pick_face(faces: list[FaceBox], index: int = 0, remedy: str = "Use a clear, frontal portrait.") -> FaceBox:
    """The ``index``-th face (0 = largest); a clear error when there is none or too few.

    ``remedy``: what the caller offers when detection finds nothing (its own options, named as its user sees them).
    """
    if not faces:
        raise FaceNotFoundError(f"No face was found in the reference image. {remedy}")
    if not 0 <= index < len(faces):
        raise FaceNotFoundError(f"Face index {index} asked for, but only {len(faces)} face(s) were found (0 = largest).")
    return faces[index]


def box_from_mask(mask: torch.Tensor) -> FaceBox:
    """Bounding box of the mask's pixels above 0.5 ([H, W] or [1, H, W], values 0..1, ComfyUI MASK layout)."""
    mask = mask.squeeze(0) if mask.ndim == 3 else mask
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise FaceNotFoundError("The face mask is empty: paint the face region, or use detection.")
    return FaceBox(float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)


def check_margin(margin: float) -> float:
    """``margin`` (of :func:`square_crop`) when it is a number >= 0, else a SettingsError (NaN too)."""
    if not margin >= 0:  # NaN passes ``< 0``
        raise SettingsError(f"the face margin must be a number >= 0 ({DEFAULT_MARGIN} by default), got {margin}.")
    return margin


def square_crop(face: FaceBox, image_height: int, image_width: int, margin: float = DEFAULT_MARGIN) -> CropInfo:
    """A square around ``face``: side = face size x (1 + 2 margin), centred on the face, shifted to stay inside the
    image where it fits, and never larger than the image's shorter side unless the face itself needs it."""
    check_margin(margin)
    side = max(face.x1 - face.x0, face.y1 - face.y0) * (1 + 2 * margin)
    size = int(round(min(side, max(min(image_height, image_width), face.x1 - face.x0, face.y1 - face.y0))))
    cx, cy = (face.x0 + face.x1) / 2, (face.y0 + face.y1) / 2
    x = int(round(min(max(cx - size / 2, 0), max(image_width - size, 0))))
    y = int(round(min(max(cy - size / 2, 0), max(image_height - size, 0))))
    inner = FaceBox(face.x0 - x, face.y0 - y, face.x1 - x, face.y1 - y, face.score)
    return CropInfo(x, y, size, image_height, image_width, inner)


def crop_image(image: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """Cut the square out of ``image`` [H, W, C] (edge-padded where it reaches outside): [size, size, C]."""
    h, w = image.shape[:2]
    pad = (max(0, -info.x), max(0, info.x + info.size - w), max(0, -info.y), max(0, info.y + info.size - h))
    chw = image.permute(2, 0, 1)[None].float()
    if any(pad):
        chw = F.pad(chw, pad, mode="replicate")
    x, y = info.x + pad[0], info.y + pad[2]
    return chw[0, :, y:y + info.size, x:x + info.size].permute(1, 2, 0).to(image.dtype)


def feather_mask(size: int, feather: int, sides: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> torch.Tensor:
    """[size, size] weights: 1 inside, falling linearly to 0 over ``feather`` pixels towards each edge in ``sides``
    (left, top, right, bottom); edges not in ``sides`` stay at 1."""
    if feather <= 0:
        return torch.ones(size, size)
    ramp = ((torch.arange(size, dtype=torch.float32) + 0.5) / feather).clamp(max=1)
    one = torch.ones(size)
    left, top, right, bottom = sides
    wx = torch.minimum(ramp if left else one, ramp.flip(0) if right else one)
    wy = torch.minimum(ramp if top else one, ramp.flip(0) if bottom else one)
    return wy[:, None] * wx[None, :]


def paste_back(frames: torch.Tensor, background: torch.Tensor, info: CropInfo, feather: int = 16) -> torch.Tensor:
    """Put generated crop frames back into the full-resolution reference.

    Args:
        frames: [F, h, w, 3] in 0..1, generated from the crop (any size; resized to the crop's side).
        background: [H, W, 3] (the reference) or [F, H, W, 3] in 0..1.
        feather: width in original pixels of the blend at the crop's edge (not where the crop met the image edge).
    Returns:
        [F, H, W, 3] in 0..1.
    """
    if frames.ndim != 4 or background.shape[-1] != frames.shape[-1]:
        raise ImageInputError(f"frames must be [F, h, w, C] like the background; got {tuple(frames.shape)} and "
                              f"{tuple(background.shape)}.")
    n = frames.shape[0]
    if background.ndim == 3:
        background = background[None].expand(n, -1, -1, -1)
    if background.shape[1:3] != (info.image_height, info.image_width):
        raise ImageInputError(f"background is {tuple(background.shape[1:3])}, the crop was made from "
                              f"{(info.image_height, info.image_width)}.")
    crop = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(info.size, info.size), mode="bicubic",
                         align_corners=False).clamp(0, 1)
    x0, y0, x1, y1 = info.x, info.y, info.x + info.size, info.y + info.size
    h, w = info.image_height, info.image_width
    # no blend along sides where the square meets the image border: there is nothing to blend with
    weight = feather_mask(info.size, feather, (x0 > 0, y0 > 0, x1 < w, y1 < h))
    out = background.permute(0, 3, 1, 2).float().clone()
    # the part of the square inside the image
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    cx0, cy0 = sx0 - x0, sy0 - y0
    region = (slice(None), slice(None), slice(sy0, sy1), slice(sx0, sx1))
    patch = crop[:, :, cy0: cy0 + sy1 - sy0, cx0: cx0 + sx1 - sx0]
    wgt = weight[cy0: cy0 + sy1 - sy0, cx0: cx0 + sx1 - sx0]
    out[region] = patch * wgt + out[region] * (1 - wgt)
    return out.permute(0, 2, 3, 1)
