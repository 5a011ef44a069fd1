"""A long video's frames are let go segment by segment, whether written to an mp4 or joined into IMAGE frames."""

import gc
import weakref

import torch

from fantasytalking_core.audio.timeline import SegmentPlan
from fantasytalking_core.long_video import stream_to_file
from nodes.convert import join_frames

FPS = 23
CHUNKS, CHUNK_FRAMES = 6, 8


def chunks_let_go(alive_after: list[int]):
    """Yield CHUNKS chunks of [CHUNK_FRAMES, 32, 32, 3] frames; before each, record how many chunks older than the
    consumer's current one are still in memory (the consumer holds the last chunk it got while asking for the
    next)."""
    made = []
    for i in range(CHUNKS):
        gc.collect()
        alive_after.append(sum(ref() is not None for ref in made[:-1]))
        chunk = torch.rand(CHUNK_FRAMES, 32, 32, 3, generator=torch.Generator().manual_seed(i))
        made.append(weakref.ref(chunk))
        yield chunk
        del chunk


def test_the_mp4_writer_keeps_no_segment_for_its_preview_frames(tmp_path):
    # the preview frames were views: each kept its whole segment alive, so "memory of one segment" held every
    # segment that gave a preview frame (about 1,280 frames of a 10-minute video)
    alive = []
    plan = SegmentPlan(CHUNKS * CHUNK_FRAMES, FPS, CHUNK_FRAMES + 1, 1, 0, ())  # the writer needs frames and fps
    report = stream_to_file(chunks_let_go(alive), plan, tmp_path / "long.mp4", None, None, sample_frames=CHUNKS * 2)
    assert alive == [0] * CHUNKS
    assert report.samples.shape == (CHUNKS * 2, 32, 32, 3)
    assert torch.equal(report.samples[1], torch.rand(CHUNK_FRAMES, 32, 32, 3,
                                                     generator=torch.Generator().manual_seed(0))[4])


def test_frames_kept_as_images_are_joined_as_they_come():
    # torch.cat of the whole list held every chunk and the joined copy at once: twice the tooltip's memory
    alive = []
    frames = join_frames(chunks_let_go(alive), CHUNKS * CHUNK_FRAMES)
    assert alive == [0] * CHUNKS
    expected = torch.cat([torch.rand(CHUNK_FRAMES, 32, 32, 3, generator=torch.Generator().manual_seed(i))
                          for i in range(CHUNKS)])
    assert torch.equal(frames, expected)
