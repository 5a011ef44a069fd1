"""One integer frame grid over a whole recording, cut into overlapping segments of the trained clip length.

The model makes clips of at most ``segment_frames`` (81 by default, 3.5 s at 23 frames/s). A longer recording is
generated as a chain of segments laid on ONE global frame grid: output frame ``g`` (0 <= g < N) shows the instant
``g / fps`` seconds, whatever segment it comes from.

Segment rule (pure integer arithmetic, see :func:`segment_spans`):
    N = the official frame rule on the whole recording, uncapped (``frames_for_duration(duration, fps, None)``),
    L = segment_frames (4n+1), K = overlap (4m+1, 1 <= K < L): the frames a segment is given from the previous
    one (K = 1 for ``last_frame`` chaining, K = M motion frames for ``motion_frames`` chaining), S = L - K.
    One segment when N <= L (the official clip). Otherwise n = 1 + ceil((N - L) / S) segments, all L frames long:
    segment i < n - 1 starts at global frame ``s_i = i * S``; the last one ends at the last frame,
    ``s_{n-1} = N - L``. Segment 0 outputs all its frames; segment i > 0 outputs its local frames from
    ``keep_from = s_{i-1} + L - s_i`` on, i.e. from the frame after the previous segment's last: K for every
    segment but the last, between K and L - 4 for the last (it re-makes some of the previous segment's frames
    rather than be a short clip past the end of the audio). So the outputs tile [0, N): every global frame
    exactly once, none dropped or duplicated at a seam. N, L, K are 4n+1, so S and N - L are multiples of 4
    and every start is on the grid of latent frames of the previous segment.

Audio alignment (see :func:`audio_slice`): the global wav2vec2 features (``TOKENS_PER_SECOND`` = 50 tokens/s,
token ``t`` starting at ``t / 50`` s) are cut per segment and the official window rule
(``audio/windows.py``) is applied to the segment's own slice. That rule maps local frame k of a clip of F frames
and T tokens to token position ``k * T / F`` (frame 0 <-> token 0, frame F <-> token T). With the slice starting
at token ``a`` the frame's audio sits at ``(a + k * T / F) / 50`` s on the global timeline; the frame itself
is at ``(s + k) / fps``. The difference is linear in k, so its largest value over a segment is at k = 0 or
k = F - 1; :func:`audio_slice` picks the integers (a, T) that minimise it. Rounding the start and the end token
each costs at most half a token, so the misalignment is at most ~0.5 token = 0.5 * fps / 50 frames (0.23 frames
at 23 frames/s), under half a frame for any fps below 50 - the timeline test checks every frame of 10 minutes.
A recording that fits one segment keeps the official clip unchanged: all its tokens, a = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .rules import (BASE_CONV_KERNEL, BASE_CONV_STRIDE, SAMPLE_RATE, crop_samples_for_frames, receptive_field,
                    wav2vec2_num_tokens)

DEFAULT_SEGMENT_FRAMES = 81  # the official clip length (infer.py max_num_frames), the length the model was trained on
DEFAULT_MOTION_FRAMES = 9  # frames shared between segments in motion_frames chaining (3 latent frames)
# wav2vec2-base: one token per 320 samples at 16 kHz (the conv stack's total stride)
TOKENS_PER_SECOND = SAMPLE_RATE / receptive_field(BASE_CONV_KERNEL, BASE_CONV_STRIDE)[1]


def _check_4n1(name: str, value: int, minimum: int) -> None:
    if int(value) != value or value < minimum or (value - 1) % 4:
        raise ValueError(f"{name} must be 4n+1 and at least {minimum} (e.g. 81), got {value!r}.")


@dataclass(frozen=True)
class Segment:
    """One segment of a :class:`SegmentPlan`.

    Attributes:
        index: position in the chain (0-based).
        start: global frame of the segment's local frame 0.
        num_frames: frames the segment generates (4n+1).
        keep_from: first local frame that goes to the output: 0 for the first segment, else the number of frames
            it shares with the previous one (K, more for the last segment).
        token_start: first global wav2vec2 token of the segment's audio slice.
        num_tokens: tokens in the slice (the official window rule runs on exactly these).
        valid_tokens: the slice's tokens that exist; fewer than ``num_tokens`` only in the last segment when the
            video outlasts the recording (the official frame rule adds up to 5 frames): the missing ones are
            end padding that attention leaves out, as the official rule pads windows past the end.
    """

    index: int
    start: int
    num_frames: int
    keep_from: int
    token_start: int
    num_tokens: int
    valid_tokens: int

    @property
    def output_frames(self) -> range:
        """Global frames this segment contributes to the video."""
        return range(self.start + self.keep_from, self.start + self.num_frames)


@dataclass(frozen=True)
class SegmentPlan:
    """A recording of ``num_frames`` frames at ``fps`` frames/s cut into segments (see the module docstring)."""

    num_frames: int
    fps: float
    segment_frames: int
    overlap: int
    num_tokens: int
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def longest(self) -> int:
        """Frames of the longest segment: what one denoising run must hold."""
        return max(segment.num_frames for segment in self.segments)


def segment_spans(num_frames: int, segment_frames: int = DEFAULT_SEGMENT_FRAMES,
                  overlap: int = 1) -> list[tuple[int, int, int]]:
    """(start frame, frame count, keep_from) of every segment (the rule in the module docstring).

    Args:
        num_frames: N, frames of the whole video (4n+1, >= 5).
        segment_frames: L, segment length (4n+1, >= 5).
        overlap: K, frames each segment is given from the previous one (4m+1, 1 <= K < L).
    Returns:
        per segment: global start frame, frames (L, or N for a single segment), first local frame it outputs.
    """
    _check_4n1("num_frames", num_frames, 5)
    _check_4n1("segment_frames", segment_frames, 5)
    _check_4n1("overlap", overlap, 1)
    if overlap >= segment_frames:
        raise ValueError(f"the overlap ({overlap} frames) must be shorter than a segment ({segment_frames} frames).")
    if num_frames <= segment_frames:
        return [(0, num_frames, 0)]
    stride = segment_frames - overlap
    count = 1 + math.ceil((num_frames - segment_frames) / stride)
    starts = [i * stride for i in range(count - 1)] + [num_frames - segment_frames]
    return [(start, segment_frames, 0 if i == 0 else starts[i - 1] + segment_frames - start)
            for i, start in enumerate(starts)]


def slice_misalignment(start: int, num_frames: int, token_start: int, num_tokens: int, fps: float,
                       tokens_per_second: float = TOKENS_PER_SECOND) -> float:
    """Largest |audio time - frame time| over a segment's frames, in frames (see the module docstring).

    Local frame k (0 <= k < num_frames) hears token ``token_start + k * num_tokens / num_frames``; it shows global
    frame ``start + k``. The error is linear in k, so the ends k = 0 and k = num_frames - 1 bound it.
    """
    rate = tokens_per_second / fps  # tokens per frame
    ends = (0, num_frames - 1)
    return max(abs(token_start + k * num_tokens / num_frames - (start + k) * rate) for k in ends) / rate


def official_clip_tokens(num_frames: int, fps: float) -> int:
    """Tokens the official code gives a clip of ``num_frames`` (its audio crop through wav2vec2's conv stack)."""
    return wav2vec2_num_tokens(crop_samples_for_frames(num_frames, fps))


def audio_slice(start: int, num_frames: int, fps: float, total_tokens: int,
                tokens_per_second: float = TOKENS_PER_SECOND) -> tuple[int, int]:
    """(token_start, num_tokens) of the global features for a segment, minimising the misalignment.

    Candidates: the start and end tokens rounded down and up around the segment's exact audio span (and one more
    on each side), the start inside [0, total_tokens). The end may pass ``total_tokens``: the recording can end
    up to 5 frames before the video (the official frame rule), and squeezing the last segment's slice into the
    tokens that exist would stretch its audio by several frames; the missing tokens become padding instead,
    which attention leaves out (see :class:`Segment`). Ties go to the token count of an official clip of the same length
    (the token density the model saw), then to the earlier start.

    Args:
        start: global frame of the segment's first frame; num_frames: its frames; fps: frames/s.
        total_tokens: tokens of the global features.
    """
    rate = tokens_per_second / fps
    begin, end = start * rate, (start + num_frames) * rate  # exact token positions of the segment's span
    official = official_clip_tokens(num_frames, fps)
    best = None
    for a in range(max(0, math.floor(begin) - 1), min(total_tokens - 1, math.ceil(begin) + 1) + 1):
        for b in range(max(a + 1, math.floor(end) - 1), math.ceil(end) + 2):
            error = slice_misalignment(start, num_frames, a, b - a, fps, tokens_per_second)
            key = (round(error, 9), abs(b - a - official), a)
            if best is None or key < best[0]:
                best = (key, a, b - a)
    if best is None:
        raise ValueError(f"no audio tokens for frames {start}..{start + num_frames - 1} ({total_tokens} tokens).")
    return best[1], best[2]


def plan_segments(num_frames: int, fps: float, num_tokens: int, segment_frames: int = DEFAULT_SEGMENT_FRAMES,
                  overlap: int = 1, tokens_per_second: float = TOKENS_PER_SECOND) -> SegmentPlan:
    """The segments of a video of ``num_frames`` at ``fps`` whose global features have ``num_tokens`` tokens.

    One segment (N <= L) is the official clip: every token, nothing moved. Otherwise see :func:`segment_spans`
    and :func:`audio_slice`.
    """
    spans = segment_spans(num_frames, segment_frames, overlap)
    if len(spans) == 1:  # the official clip, bit for bit
        return SegmentPlan(num_frames, float(fps), segment_frames, overlap, num_tokens,
                           (Segment(0, 0, num_frames, 0, 0, num_tokens, num_tokens),))
    segments = []
    for i, (start, length, keep_from) in enumerate(spans):
        token_start, count = audio_slice(start, length, fps, num_tokens, tokens_per_second)
        segments.append(Segment(i, start, length, keep_from, token_start, count,
                                min(count, num_tokens - token_start)))
    return SegmentPlan(num_frames, float(fps), segment_frames, overlap, num_tokens, tuple(segments))
