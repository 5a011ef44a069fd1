"""A recording of any length to an mp4, segment by segment, in memory bounded by one segment.

Used by the command line (and the long-audio benchmark): :meth:`FantasyTalkingPipeline.stream` makes the frames
one segment at a time, and each segment's final frames go straight into :class:`~.media.video.VideoStreamWriter`,
which writes a temporary file and renames it at the end, so a failed or interrupted run leaves no partial video.
:func:`stream_to_file` is that writing loop on its own; the ComfyUI sampler node streams its segments through it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .audio.io import DecodedAudio
from .audio.timeline import SegmentPlan
from .face.workflow import PreparedJob
from .media.video import DEFAULT_CRF, VideoStreamWriter
from .pipeline import FantasyTalkingPipeline
from .sampling.segments import SegmentOptions

ProgressFn = Callable[[int, int], None]


@dataclass
class LongVideoReport:
    """path: the written mp4; plan: the segments; segment_seconds: wall time of each segment (denoise, decode,
    write); samples: up to ``sample_frames`` frames spread over the video (for an identity check), [n, H, W, 3]."""

    path: os.PathLike
    plan: SegmentPlan
    fps: float
    segment_seconds: list[float] = field(default_factory=list)
    samples: torch.Tensor | None = None


def write_long_video(
    pipe: FantasyTalkingPipeline,
    job: PreparedJob,
    audio: str | os.PathLike | Mapping | DecodedAudio,
    options: SegmentOptions,
    path: str | os.PathLike,
    progress: ProgressFn | None = None,
    sample_frames: int = 0,
    crf: int = DEFAULT_CRF,
) -> LongVideoReport:
    """Generate ``job`` (from ``face.workflow.prepare_job``) on ``audio`` in segments and stream it to ``path``.

    ``progress(step, total)`` counts every segment's steps and may raise to interrupt (the file is then not
    written). Only the current segment's frames (and ``sample_frames`` kept frames) are in memory. ``crf``: the
    H.264 quality (``media.video.write_video``).
    """
    stream = pipe.stream(job.image, audio, job.settings, options, progress)
    return stream_to_file((job.finish(chunk) for chunk in stream.frames), stream.plan, path, stream.audio,
                          stream.sample_rate, sample_frames, crf)


def stream_to_file(
    chunks: Iterable[torch.Tensor],
    plan: SegmentPlan,
    path: str | os.PathLike,
    audio: torch.Tensor | None,
    sample_rate: int | None,
    sample_frames: int = 0,
    crf: int = DEFAULT_CRF,
) -> LongVideoReport:
    """Write a segmented video's frame chunks (``pipeline.stream`` or ``sampling.segments.generate_segments``) to
    an mp4 with the voice as they come, through :class:`~.media.video.VideoStreamWriter`.

    Args:
        chunks: float32 [f, H, W, 3] in 0..1, ``plan.num_frames`` frames in all; the work happens as they are
            consumed, and an exception from them (an interrupt) leaves no file.
        plan: the segments (its fps is the video's).
        audio: [C, T] float waveform in -1..1, or None for a silent video; sample_rate: its rate in Hz.
        sample_frames: keep up to this many frames spread evenly over the video (every ceil(F / n)-th, from 0).
        crf: H.264 quality (``media.video.write_video``).
    """
    report = LongVideoReport(path, plan, plan.fps)
    every = -(-plan.num_frames // sample_frames) if sample_frames else 0  # ceil: at most sample_frames
    kept, shown = [], 0
    start = time.perf_counter()
    with VideoStreamWriter(path, plan.fps, audio, sample_rate, crf) as writer:
        for frames in chunks:
            writer.write(frames)
            if every:  # copies: a view would keep its whole segment in memory to the end
                kept += [frames[i - shown].clone() for i in range(shown, shown + len(frames)) if i % every == 0]
            shown += len(frames)
            now = time.perf_counter()
            report.segment_seconds.append(now - start)
            start = now
    report.path = writer.path
    report.samples = torch.stack(kept) if kept else None
    return report
