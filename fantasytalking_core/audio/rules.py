"""The official frame, crop and token-count rules (Fantasy-AMAP/fantasy-talking ``infer.py``), exact.

A recording of ``duration`` seconds makes ``min(int(fps * duration // 4) * 4 + 5, max_frames)`` video frames; the
audio the model hears is the first ``int(num_frames / fps * 16000)`` samples at 16 kHz; wav2vec2 makes one token
per 320 samples (50 per second) after its 400-sample receptive field.
"""

from __future__ import annotations

import math

import torch

from ..errors import AudioInputError
from ..model.limits import check_video_frames
from .io import TARGET_SAMPLE_RATE

SAMPLE_RATE = TARGET_SAMPLE_RATE
DEFAULT_FPS = 23
FPS_RANGE = (1.0, 120.0)
"""Frame rates offered (frames per second; the official one is 23): below 1 a second of voice has no frame of its own,
above 120 a clip covers too little of the recording to move."""
DEFAULT_MAX_FRAMES = 81
BASE_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)  # wav2vec2-base's feature-encoder conv stack (samples per layer)
BASE_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def frames_for_duration(duration_s: float, fps: float = DEFAULT_FPS, max_frames: int | None = DEFAULT_MAX_FRAMES) -> int:
    """Number of video frames for a recording, the official rule ``min(int(fps * duration // 4) * 4 + 5, max)``.

    The result is always 4k+1 (what Wan's VAE needs). Uncapped, the video lasts between 1 and 5 frames longer
    than the audio (``fps * duration < num_frames <= fps * duration + 5``); capped, it is shorter.

    Args:
        duration_s: length of the recording in seconds (>= 0).
        fps: video frame rate (> 0). The official default is 23.
        max_frames: cap (4k+1, 5..``model.limits.MAX_VIDEO_FRAMES``; one clip holds at most 4093 frames, a longer
            video is made in segments), or None for no cap. The official default is 81.
    """
    if not math.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not math.isfinite(float(duration_s)) or duration_s < 0:
        raise ValueError(f"duration_s must be a finite number of seconds >= 0, got {duration_s!r}")
    if max_frames is not None:
        check_video_frames(max_frames)
    # Same float expression as infer.py, so boundary cases round identically.
    num_frames = int(fps * duration_s // 4) * 4 + 5
    return num_frames if max_frames is None else min(num_frames, int(max_frames))


def crop_samples_for_frames(num_frames: int, fps: float = DEFAULT_FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of 16 kHz samples the official code keeps for ``num_frames``: ``int(num_frames / fps * sr)``."""
    return int(num_frames / fps * sample_rate)


def crop_for_frames(waveform_16k: torch.Tensor, num_frames: int, fps: float = DEFAULT_FPS) -> torch.Tensor:
    """Keep the first ``int(num_frames / fps * 16000)`` samples of a 16 kHz waveform [T] (fewer if it is shorter)."""
    return waveform_16k[: crop_samples_for_frames(num_frames, fps)]


def wav2vec2_num_tokens(
    num_samples: int,
    conv_kernel: tuple[int, ...] | list[int] = BASE_CONV_KERNEL,
    conv_stride: tuple[int, ...] | list[int] = BASE_CONV_STRIDE,
) -> int:
    """Tokens L that wav2vec2's conv stack makes from ``num_samples`` (0 when the input is too short).

    Each layer maps n -> floor((n - kernel) / stride) + 1; for wav2vec2-base 400 samples (25 ms) give 1 token and
    every further 320 samples (20 ms) one more, i.e. ~50 tokens per second.
    """
    n = int(num_samples)
    for k, s in zip(conv_kernel, conv_stride):
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def check_long_enough(num_samples: float, conv_kernel: tuple[int, ...] | list[int] = BASE_CONV_KERNEL,
                      conv_stride: tuple[int, ...] | list[int] = BASE_CONV_STRIDE) -> None:
    """An AudioInputError when ``num_samples`` at 16 kHz (fractional for a recording at another rate) are fewer
    than one wav2vec2 token's receptive field (400 samples, 25 ms, for wav2vec2-base): known from the decoded
    file, before any model loads."""
    field, _ = receptive_field(conv_kernel, conv_stride)
    if num_samples < field:
        raise AudioInputError(f"The audio is {1000 * num_samples / SAMPLE_RATE:.1f} ms long; wav2vec2 needs at least "
                              f"{1000 * field / SAMPLE_RATE:.0f} ms ({field} samples at 16 kHz) to make one feature. "
                              "Give a longer recording.")


QUIET_PEAK = 0.01  # -40 dBFS: a speech recording peaks far above; below, wav2vec2 mostly hears the noise floor


def recording_warnings(peak: float, duration_s: float, fps: float, num_frames: int) -> list[str]:
    """What the user should know before a long run, from the recording's peak (full scale 1), its length in
    seconds and the video's fps and frame count: (near-)silence, a recording shorter than a latent frame."""
    found = []
    if peak == 0.0:
        found.append("the recording is digital silence: the face will not speak")
    elif peak < QUIET_PEAK:
        found.append(f"the recording is nearly silent (peak {20 * math.log10(peak):.0f} dBFS): wav2vec2 hears "
                     "mostly noise, so the lips will move at random; use a louder recording")
    latent_frame_s = 4 / fps  # Wan's VAE packs 4 video frames into one latent frame
    if duration_s < latent_frame_s:
        found.append(f"the recording ({duration_s:.2f} s) is shorter than one latent frame ({latent_frame_s:.2f} s "
                     f"at {fps:g} fps): the {num_frames}-frame video is mostly padding")
    return found


def receptive_field(conv_kernel: tuple[int, ...] | list[int], conv_stride: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(samples one output token sees, samples between consecutive tokens) of a conv stack: (400, 320) for base."""
    field, hop = 1, 1
    for k, s in zip(conv_kernel, conv_stride):
        field += (k - 1) * hop
        hop *= s
    return field, hop
