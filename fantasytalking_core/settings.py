"""What a user chooses for one video (:class:`GenerationSettings`, defaults: the official ``infer.py``) and the
official negative prompt, checked as soon as they are made.

Kept apart from ``pipeline.py`` and free of diffusers and transformers, so that the command line answers a bad
setting in a moment, before the heavy libraries (let alone any model) load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .audio.rules import FPS_RANGE
from .errors import SettingsError
from .face.motion import MotionIntensity
from .model.limits import check_image_size, check_max_frames
from .runtime.attention import check_attention
from .sampling.guidance import GuidanceConfig, max_passes
from .sampling.segments import MAX_SEED, MIN_SEED
from .sampling.step_cache import check_cache_can_skip, check_step_cache

# The negative prompt FantasyTalking's infer.py passes by default (Wan's standard Chinese negative prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

DISTILLED = {"steps": 4, "cfg": 1.0}
"""Settings for a step-distillation LoRA (lightx2v's Wan 2.1 I2V ones): 4 steps, no text guidance (cfg 1 drops the
negative pass); audio guidance is kept, so each step still runs two passes (positive, positive + audio)."""


@dataclass
class GenerationSettings:
    """Everything a user chooses for one video (defaults: the official ``infer.py``).

    Attributes:
        fps: video frames per second; the frame count follows the audio (``4*floor(fps*duration/4)+5``).
        max_frames: cap on the frame count (4n+1, at most ``model.limits.MAX_FRAMES`` = 4093).
        image_size: longest edge of the video in pixels (sides rounded up to multiples of 16; at most 16384).
        cfg, audio_cfg: text and audio guidance scales; audio_scale: strength of the audio branch.
        audio_guidance_range: fraction of the steps [start, end) with audio guidance.
        batch_passes: run the guidance passes of a step as one batch (faster on a big GPU).
        vae_tile: decode in spatial tiles of this many pixels (bounded memory), or None.
        motion: face/body motion intensity (training-free, see ``face/motion.py``); None = official behaviour.
        face_box: (x0, y0, x1, y1) of the face in video-frame pixels, where the face intensity applies.
        attention: the DiT's attention kernels: sdpa (default), flash, sage or xformers when installed
            (``runtime/attention.py``).
        compile: regional ``torch.compile`` of the DiT blocks for this run (``runtime/compile.py``): faster steps
            after a one-off compile; results equal eager ones to float rounding.
        fp8_matmul: real fp8 matrix multiplies for fp8-stored weights on GPUs that have them (compute capability
            8.9+; ``runtime/fp8.py``); elsewhere the weights upcast as without it.
        step_cache: first-block-cache threshold, opt-in (``sampling/step_cache.py``): 0 = off (every block runs,
            the official computation); typical 0.05-0.1. Each guidance pass keeps its own cache; the first
            ``FIRST_STEPS`` (3) and last ``LAST_STEPS`` (2) steps always run every block.
    """

    prompt: str = "A person is talking."
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 1111
    steps: int = 30
    shift: float = 5.0
    cfg: float = 5.0
    audio_cfg: float = 5.0
    audio_scale: float = 1.0
    audio_guidance_range: tuple[float, float] = (0.0, 1.0)
    fps: float = 23
    max_frames: int = 81
    image_size: int = 512
    batch_passes: bool = False
    vae_tile: int | None = None
    motion: MotionIntensity | None = None
    face_box: tuple[float, float, float, float] | None = None
    attention: str = "sdpa"
    compile: bool = False
    fp8_matmul: bool = False
    step_cache: float = 0.0

    def __post_init__(self) -> None:
        """Check every setting before any work, so a bad value fails in a second, not after the models load."""
        start, end = self.audio_guidance_range
        numbers = {"fps": self.fps, "shift": self.shift, "cfg": self.cfg, "audio_cfg": self.audio_cfg,
                   "audio_scale": self.audio_scale}
        problems = [
            *((not math.isfinite(value), f"{name} must be a finite number, got {value}")
              for name, value in numbers.items()),
            (not isinstance(self.seed, int) or not MIN_SEED <= self.seed <= MAX_SEED,
             f"seed must be a whole number from {MIN_SEED} to {MAX_SEED}, got {self.seed}"),
            (self.steps < 1, f"steps must be at least 1, got {self.steps}"),
            (not FPS_RANGE[0] <= self.fps <= FPS_RANGE[1],
             f"fps must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g} frames per second (23 official), got {self.fps}"),
            (self.shift <= 0, f"shift must be positive (5 official), got {self.shift}"),
            (not 0 <= start <= end <= 1, f"the audio guidance range must satisfy 0 <= start <= end <= 1, got "
                                         f"[{start}, {end}]"),
            (self.vae_tile is not None and (self.vae_tile < 64 or self.vae_tile % 32),
             f"vae_tile must be a multiple of 32 and at least 64 pixels (e.g. 256), got {self.vae_tile}"),
            (self.audio_scale < 0, f"audio_scale must be >= 0, got {self.audio_scale}"),
        ]
        for bad, message in problems:
            if bad:
                raise SettingsError(message + ".")  # the finite checks come first: NaN passes ``x <= 0``
        self.seed %= MAX_SEED + 1  # a negative seed is the generator's same seed counted from 2**64
        check_max_frames(self.max_frames)  # the DiT's reach in time and space (model/limits.py)
        check_image_size(self.image_size)
        check_attention(self.attention)  # an uninstalled kernel library fails here, not after the models load
        self.step_cache = check_step_cache(self.step_cache)
        check_cache_can_skip(self.step_cache, self.steps)

    def max_passes(self) -> int:
        """The most DiT passes any step of this run needs (3 with text and audio guidance, fewer at cfg 1): how
        many guidance ranks a parallel layout can use."""
        return max_passes(self.steps, GuidanceConfig(self.cfg, self.audio_cfg, *self.audio_guidance_range))


__all__ = ["DEFAULT_NEGATIVE_PROMPT", "DISTILLED", "GenerationSettings"]
