"""Motion intensity: a training-free stand-in for the paper's motion-intensity module.

The released FantasyTalking has no motion module (no code, no weights). What it does have is an audio branch
whose strength can vary over space: every video token gets its own ``audio_scale`` (see ``model/adapter.py``).
The audio drives lip and expression motion inside the face and head/body motion outside it, so

- ``face`` intensity scales the audio branch on the tokens covering the face region,
- ``body`` intensity scales it on every other token,

with a smooth blend on tokens that the face box covers only partly. Both map monotonically to a multiplier of
the user's audio scale (:func:`intensity_to_multiplier`): 0 -> 0 (that region ignores the voice), 0.5 -> 1 (the
official behaviour), 1 -> 1.5. At the defaults (0.5, 0.5) nothing changes: the sampler gets the plain float
``audio_scale`` and the output is identical to the official pipeline, bit for bit. Optionally the audio guidance
scale follows the mean of the two multipliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SettingsError

PATCH_PIXELS = 16  # one DiT token covers 16x16 pixels: VAE stride 8 x patch 2
DEFAULT_INTENSITY = 0.5
MAX_MULTIPLIER = 1.5


@dataclass(frozen=True)
class MotionIntensity:
    """face, body: intensities in [0, 1] (0.5 = official behaviour). affect_audio_cfg: also scale audio guidance."""

    face: float = DEFAULT_INTENSITY
    body: float = DEFAULT_INTENSITY
    affect_audio_cfg: bool = False

    def __post_init__(self) -> None:
        for name, value in (("face", self.face), ("body", self.body)):
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name} intensity must be in [0, 1] (0.5 = as released), got {value}.")

    @property
    def is_default(self) -> bool:
        return self.face == DEFAULT_INTENSITY and self.body == DEFAULT_INTENSITY


def intensity_to_multiplier(intensity: float) -> float:
    """[0, 1] -> audio-branch multiplier: piecewise linear through (0, 0), (0.5, 1), (1, 1.5); monotonic."""
    if intensity <= DEFAULT_INTENSITY:
        return intensity / DEFAULT_INTENSITY
    return 1.0 + (intensity - DEFAULT_INTENSITY) / (1 - DEFAULT_INTENSITY) * (MAX_MULTIPLIER - 1.0)


def face_coverage(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """Fraction of each token cell covered by a face box.

    Args:
        box: (x0, y0, x1, y1) in pixels of the video frame.
        height, width: video frame size in pixels (multiples of 16).
    Returns:
        [height/16, width/16] float32 in [0, 1], row-major like the DiT's tokens of one latent frame.
    """
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"face box must have x1 > x0 and y1 > y0, got {box}.")
    rows = torch.arange(height // PATCH_PIXELS, dtype=torch.float32) * PATCH_PIXELS
    cols = torch.arange(width // PATCH_PIXELS, dtype=torch.float32) * PATCH_PIXELS
    cover_y = ((torch.minimum(rows + PATCH_PIXELS, torch.tensor(float(y1))) - torch.maximum(rows, torch.tensor(float(y0))))
               .clamp(min=0) / PATCH_PIXELS)
    cover_x = ((torch.minimum(cols + PATCH_PIXELS, torch.tensor(float(x1))) - torch.maximum(cols, torch.tensor(float(x0))))
               .clamp(min=0) / PATCH_PIXELS)
    return cover_y[:, None] * cover_x[None, :]


def audio_scale_map(
    motion: MotionIntensity | None,
    audio_scale: float,
    latent_frames: int,
    height: int,
    width: int,
    face_box: tuple[float, float, float, float] | None = None,
) -> float | torch.Tensor:
    """Per-token audio strength for the sampler.

    Returns ``audio_scale`` itself (a float) at the default intensities or without ``motion``, so the official
    numbers are reproduced exactly; otherwise a [latent_frames * height/16 * width/16] float32 tensor in the DiT's
    frame-major token order. Without a face box the face intensity applies to the whole frame.
    """
    if motion is None or motion.is_default:
        return audio_scale
    face = audio_scale * intensity_to_multiplier(motion.face)
    if face_box is None:
        per_frame = torch.full((height // PATCH_PIXELS, width // PATCH_PIXELS), face)
    else:
        body = audio_scale * intensity_to_multiplier(motion.body)
        cover = face_coverage(face_box, height, width)
        per_frame = cover * face + (1 - cover) * body
    return per_frame.flatten().repeat(latent_frames)


def audio_cfg_for(motion: MotionIntensity | None, audio_cfg: float) -> float:
    """Audio guidance scale, times the mean of the two multipliers when ``affect_audio_cfg`` is set."""
    if motion is None or not motion.affect_audio_cfg or motion.is_default:
        return audio_cfg
    return audio_cfg * (intensity_to_multiplier(motion.face) + intensity_to_multiplier(motion.body)) / 2
