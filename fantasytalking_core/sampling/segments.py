"""A long video as a chain of single-clip generations on one frame grid (``audio/timeline.py``).

Each segment is one ordinary FantasyTalking clip (the single-clip denoiser, unchanged) whose audio is the
segment's slice of the recording's global wav2vec2 features and whose first frame(s) come from the previous
segment. The CLIP identity tokens always come from the original portrait (the caller's ``sample`` stage holds
them), so identity is not re-derived from generated frames.

Chaining modes (no quality comparison on the real 14B weights exists yet; ``last_frame`` is the default because it
is exactly what the model was trained on):

``last_frame``
    The previous segment's last frame is the next segment's I2V image (mask: latent frame 0 known). Segments
    share that one frame (overlap K = 1). Motion has no velocity across the seam, only position.
``motion_frames``
    The previous segment's last M frames (M = 4m+1, default 9 = 3 latent frames) are the next segment's known
    first frames: encoded with the VAE like the I2V image and marked known in the mask ``y`` (latent frames
    0..m all ones, ``encoders.vae.known_frames_mask``). Carries motion across the seam; the mask layout is the
    trained one, the number of known latent frames is not. The sample's own latent frames 0..m are denoised
    freely, guided by ``y`` only.
``pinned_latents``
    ``motion_frames``, and the sample's latent frames 0..m are also held on the forward process of the known
    frames' latents (the same latents ``y`` carries, ``encoders.vae.known_latents``): before the first step and
    after every step they are set to ``sigma * noise + (1 - sigma) * known`` with the step's sigma and the
    segment's own seeded noise (``sampling.euler.PinnedLatents``), so the model sees them at the noise level of
    the rest of the latent, and the final latent holds them exactly. InfiniteTalk chains its clips this way (with
    fresh noise each step, and the portrait in ``y``: a model trained for it); FantasyTalking was not trained with
    pinned frames.

Seams: the overlap frames are the previous segment's (already shown on screen when streaming) unless
``crossfade`` blends them with the new segment's versions of the same frames. ``color_match`` moves every
segment's Lab mean/std toward the portrait's, against slow colour and brightness drift; frames given to the next
segment are the matched ones, so a correction carries forward instead of being undone at each seam.
Seeds: segment i uses ``seed + i`` (modulo 2**64; the first segment is the single clip's seed, so a recording that fits one
segment gives today's video bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from ..audio.timeline import DEFAULT_MOTION_FRAMES, DEFAULT_SEGMENT_FRAMES, SegmentPlan
from ..media.color import match_color
from ..model.limits import MAX_FRAMES

Chaining = Literal["last_frame", "motion_frames", "pinned_latents"]
CHAININGS: tuple[str, ...] = ("last_frame", "motion_frames", "pinned_latents")
ProgressFn = Callable[[int, int], None]
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds; ComfyUI's seed widgets go up to this
MIN_SEED = -(2**63)  # torch also takes negative ones: seed s gives the noise of s + 2**64


def segment_seed(seed: int, index: int) -> int:
    """The noise seed of segment ``index`` (0-based) of a run seeded ``seed``: ``seed + index``, wrapped into the
    64 bits a generator takes (a seed near the top of ComfyUI's range stays valid in later segments)."""
    return (seed + index) % (MAX_SEED + 1)


@dataclass(frozen=True)
class SegmentOptions:
    """How a long recording is cut and chained.

    Attributes:
        segment_frames: frames per segment (4n+1; 81 = the trained clip length, 3.5 s at 23 frames/s).
        motion_frames: M, frames given from one segment to the next in ``motion_frames`` and ``pinned_latents``
            chaining (4m+1, < the segment). ``last_frame`` chaining always gives 1.
        chaining: ``last_frame``, ``motion_frames`` or ``pinned_latents`` (see the module docstring).
        color_match: Lab statistics transfer to the portrait per segment, 0 (off) .. 1 (full).
        crossfade: blend the frames two segments share instead of keeping the earlier segment's.
    """

    segment_frames: int = DEFAULT_SEGMENT_FRAMES
    motion_frames: int = DEFAULT_MOTION_FRAMES
    chaining: Chaining = "last_frame"
    color_match: float = 0.0
    crossfade: bool = False

    def __post_init__(self) -> None:
        if self.chaining not in CHAININGS:
            raise ValueError(f"chaining must be one of {', '.join(CHAININGS)}, got {self.chaining!r}.")
        if self.segment_frames < 5 or (self.segment_frames - 1) % 4:
            raise ValueError(f"segment_frames must be 4n+1 and at least 5 (e.g. 81), got {self.segment_frames}.")
        if self.segment_frames > MAX_FRAMES:
            raise ValueError(f"segment_frames {self.segment_frames} is above {MAX_FRAMES}, the longest clip the Wan2.1 "
                             f"DiT can place in time; use at most {MAX_FRAMES} (81 is the length it was trained on).")
        if self.motion_frames < 1 or (self.motion_frames - 1) % 4:
            raise ValueError(f"motion_frames must be 4m+1 (1, 5, 9, ...), got {self.motion_frames}.")
        # last_frame chaining gives one frame whatever motion_frames says: short segments need no other value
        if self.chaining != "last_frame" and self.motion_frames >= self.segment_frames:
            raise ValueError(f"motion_frames must be less than segment_frames ({self.segment_frames}) with chaining "
                             f"{self.chaining}, got {self.motion_frames}.")
        if not 0 <= self.color_match <= 1:
            raise ValueError(f"color_match must be in 0..1, got {self.color_match}.")

    @property
    def overlap(self) -> int:
        """K, the frames each segment is given from the previous one (the plan's overlap)."""
        return 1 if self.chaining == "last_frame" else self.motion_frames


def crossfade(earlier: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """Blend two versions [n, H, W, 3] of the same n frames: frame j is ``(1 - w_j) * earlier + w_j * later``
    with ``w_j = (j + 1) / (n + 1)``, rising strictly inside (0, 1), so neither side's frames jump."""
    if earlier.shape != later.shape:
        raise ValueError(f"crossfade needs two equal shapes, got {tuple(earlier.shape)} and {tuple(later.shape)}.")
    n = earlier.shape[0]
    w = torch.arange(1, n + 1, dtype=torch.float32).div(n + 1).view(n, *([1] * (earlier.ndim - 1)))
    return (1 - w) * earlier.float() + w * later.float()


ConditionFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``condition(known, num_frames)``: known first frames [3, K, H, W] in -1..1 -> the I2V ``y``."""
SampleFn = Callable[[int, torch.Tensor, torch.Tensor, int, int, ProgressFn, "torch.Tensor | None"], torch.Tensor]
"""``sample(index, y, features, num_frames, num_tokens, progress, pinned)`` -> latents: one single-clip denoising
run; ``features`` [valid_tokens, C] is the segment's slice, ``num_tokens`` the window rule's token count,
``pinned`` None or the clean latents [1, 16, P, h, w] of the first P latent frames to hold on the forward process
(``generate_latents(pinned_latents=...)``)."""
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
"""``decode(latents)`` -> frames [F, H, W, 3] float32 in 0..1 on the CPU."""


def generate_segments(
    plan: SegmentPlan,
    features: torch.Tensor,
    reference: torch.Tensor,
    options: SegmentOptions,
    *,
    condition: ConditionFn,
    sample: SampleFn,
    decode: DecodeFn,
    steps: int,
    progress: ProgressFn | None = None,
) -> Iterator[torch.Tensor]:
    """Generate ``plan`` segment by segment, yielding the video's frames in order as soon as they are final.

    One chunk per segment, as soon as it is decoded: the frames that are final then. Only the frames the next
    segment shares with the current one are held back (they are needed for its known frames and the crossfade)
    and come with the next chunk; the chunks together are the plan's ``num_frames`` frames, each exactly once.

    Args:
        plan: from ``plan_segments(..., overlap=options.overlap)``.
        features: [num_tokens, C] global wav2vec2 features of the recording (``plan.num_tokens`` rows).
        reference: [3, H, W] the portrait in -1..1 at the video size (segment 0's I2V image, colour target).
        condition, sample, decode: the single-clip stages (see the type aliases above).
        steps: denoising steps per segment (for the overall progress).
        progress: ``(step, total)`` after every step of every segment, total = steps x segments; it may raise to
            interrupt between any two steps.
    Yields:
        per segment, float32 [f, H, W, 3] in 0..1: global frames [segment start, next segment's start) (frame 0
        for the first segment; to the end for the last).
    """
    if plan.overlap != options.overlap:
        raise ValueError(f"the plan overlaps segments by {plan.overlap} frames, the options by {options.overlap}.")
    if features.shape[0] != plan.num_tokens:
        raise ValueError(f"features have {features.shape[0]} tokens, the plan was made for {plan.num_tokens}.")
    from ..encoders.vae import known_latents  # here: the settings checks import this module without diffusers

    total = steps * len(plan)
    reference_rgb = (reference.float().cpu().permute(1, 2, 0) + 1) / 2  # [H, W, 3] in 0..1
    tail: torch.Tensor | None = None  # the previous segment's frames from this segment's start on
    for seg in plan.segments:
        if tail is None:
            known = reference[:, None]  # [3, 1, H, W]
        else:
            known = tail[: plan.overlap].permute(3, 0, 1, 2) * 2 - 1  # [3, K, H, W] in -1..1
        y = condition(known, seg.num_frames)
        pinned = known_latents(y, known.shape[1]) if tail is not None and options.chaining == "pinned_latents" else None
        audio = features[seg.token_start: seg.token_start + seg.valid_tokens]
        done = seg.index * steps
        report = None if progress is None else (lambda i, n, done=done: progress(done + i, total))
        frames = decode(sample(seg.index, y, audio, seg.num_frames, seg.num_tokens, report, pinned))
        frames = match_color(frames, reference_rgb, options.color_match)
        following = plan.segments[seg.index + 1] if seg.index + 1 < len(plan) else None
        cut = seg.num_frames if following is None else following.start - seg.start
        if tail is None:
            yield frames[:cut]
        else:
            shared = crossfade(tail, frames[: seg.keep_from]) if options.crossfade else tail
            yield torch.cat([shared, frames[seg.keep_from: cut]])
        tail = None if following is None else frames[cut:].clone()  # clone: let the rest of the segment go
