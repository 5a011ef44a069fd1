"""How long and how large a video the Wan2.1 DiT can place: the reach of its rotary position table.

diffusers' ``WanRotaryPosEmbed`` holds ``rope_max_seq_len`` positions per axis (1024 in every bundled config). The
time axis counts latent frames, ``(frames - 1) / 4 + 1``; the two image axes count latent cells after the 2x2
patches, ``pixels / 16``. A video past either reach fails with a shape ``RuntimeError`` in the first denoising
step, after every encoder has run; these checks refuse it before any model loads.
"""

from __future__ import annotations

from ..errors import SettingsError
from ..media.image import SIZE_MULTIPLE

ROPE_MAX_SEQ_LEN = 1024
"""Positions per axis of the DiT's rotary table (``rope_max_seq_len`` of configs/wan2.1_i2v_14b_*.json)."""
FRAMES_PER_LATENT = 4  # Wan's VAE: the first frame, then groups of 4

MAX_FRAMES = FRAMES_PER_LATENT * (ROPE_MAX_SEQ_LEN - 1) + 1
"""4093: the most video frames (4n+1) whose latent frames fit the rotary table."""
MAX_VIDEO_FRAMES = FRAMES_PER_LATENT * 2 ** 22 + 1
"""16777217 (about 8 days at 23 frames/s): the longest video (4n+1) a recording is planned for, a sanity bound only.
A video longer than one clip is generated in segments of at most :data:`MAX_FRAMES` (``sampling/segments.py``)."""
MAX_IMAGE_SIZE = SIZE_MULTIPLE * ROPE_MAX_SEQ_LEN
"""16384: the longest frame edge in pixels whose latent patches fit the rotary table."""


def check_max_frames(max_frames: int | float) -> int:
    """``max_frames`` as an int when it is 4n+1 in 5..:data:`MAX_FRAMES`, else a SettingsError saying why."""
    if int(max_frames) != max_frames or max_frames < 5 or (max_frames - 1) % FRAMES_PER_LATENT:
        raise SettingsError(f"max_frames must be 4n+1 and at least 5 (e.g. 81, 121, 161), got {max_frames!r}.")
    if max_frames > MAX_FRAMES:
        raise SettingsError(
            f"max_frames {max_frames} is above {MAX_FRAMES}, the longest video the Wan2.1 DiT can place in time (its "
            f"position table covers {ROPE_MAX_SEQ_LEN} latent frames); use at most {MAX_FRAMES} and split a longer "
            "recording into several videos.")
    return int(max_frames)


def check_video_frames(max_frames: int | float) -> int:
    """A cap on a whole video's frames (made in segments when longer than a clip) as an int when it is 4n+1 in
    5..:data:`MAX_VIDEO_FRAMES`, else a SettingsError saying why."""
    if int(max_frames) != max_frames or max_frames < 5 or (max_frames - 1) % FRAMES_PER_LATENT:
        raise SettingsError(f"max_frames must be 4n+1 and at least 5 (e.g. 81, 121, 161), got {max_frames!r}.")
    if max_frames > MAX_VIDEO_FRAMES:
        raise SettingsError(f"max_frames {max_frames} is above {MAX_VIDEO_FRAMES} (about 8 days at 23 fps); use at "
                            f"most {MAX_VIDEO_FRAMES}.")
    return int(max_frames)


def check_image_size(image_size: int) -> int:
    """``image_size`` (longest frame edge, pixels) when it is in 16..:data:`MAX_IMAGE_SIZE`, else a SettingsError."""
    if image_size < SIZE_MULTIPLE:
        raise SettingsError(f"image_size must be at least {SIZE_MULTIPLE} pixels, got {image_size}.")
    if image_size > MAX_IMAGE_SIZE:
        raise SettingsError(
            f"image_size {image_size} is above {MAX_IMAGE_SIZE} pixels, the largest frame the Wan2.1 DiT can place "
            f"(its position table covers {ROPE_MAX_SEQ_LEN} patches of {SIZE_MULTIPLE} pixels per side); use at most "
            f"{MAX_IMAGE_SIZE} (512 or 720 are the sizes it was trained at).")
    return int(image_size)
