"""The global frame grid of long recordings: every frame once, each on its own audio to within half a frame."""

import pytest

from fantasytalking_core.audio.rules import frames_for_duration, wav2vec2_num_tokens
from fantasytalking_core.audio.timeline import TOKENS_PER_SECOND, plan_segments, segment_spans, slice_misalignment
from fantasytalking_core.audio.windows import audio_windows_for_frames


def plan_for(seconds, fps, segment_frames=81, overlap=1):
    """The plan of a recording of exactly ``seconds`` (its features have the tokens wav2vec2 makes of it)."""
    num_frames = frames_for_duration(seconds, fps, None)
    return plan_segments(num_frames, fps, wav2vec2_num_tokens(int(seconds * 16000)), segment_frames, overlap)


def frame_audio_times(plan):
    """(global frame, audio time in s, output?) for every frame every segment generates, seams included."""
    for seg in plan.segments:
        for k in range(seg.num_frames):
            token = seg.token_start + k * seg.num_tokens / seg.num_frames  # the official rule's frame -> token map
            yield seg.start + k, token / TOKENS_PER_SECOND, k >= seg.keep_from


@pytest.mark.parametrize("fps", [23, 25, 16])
@pytest.mark.parametrize("overlap", [1, 9])
def test_ten_minutes_every_frame_once_and_within_half_a_frame_of_its_audio(fps, overlap):
    plan = plan_for(600.0, fps, overlap=overlap)
    assert plan.num_frames == frames_for_duration(600.0, fps, None) and len(plan) > 100
    shown, worst = [], 0.0
    for frame, audio_s, output in frame_audio_times(plan):
        worst = max(worst, abs(audio_s - frame / fps) * fps)  # in frames, over every generated frame
        if output:
            shown.append(frame)
    assert shown == list(range(plan.num_frames))  # in order, each exactly once: nothing dropped or doubled
    assert worst < 0.5
    # the closed form the planner minimises agrees with the frame-by-frame check
    assert worst == pytest.approx(max(slice_misalignment(s.start, s.num_frames, s.token_start, s.num_tokens, fps)
                                      for s in plan.segments), abs=1e-9)
    for seg in plan.segments:  # every segment is a valid clip for the official window rule
        assert seg.num_frames == 81 and seg.token_start + seg.valid_tokens <= plan.num_tokens
        windows = audio_windows_for_frames(seg.num_tokens, seg.num_frames, valid_tokens=seg.valid_tokens)
        assert min(windows.k_lens) >= 1


@pytest.mark.parametrize("fps", [23, 25, 16, 30])
@pytest.mark.parametrize("segment_frames,overlap", [(13, 1), (13, 5), (17, 9), (81, 9)])
def test_any_length_tiles_the_grid(fps, segment_frames, overlap):
    for tenths in range(5, 400, 7):
        plan = plan_for(tenths / 10, fps, segment_frames, overlap)
        shown = [f for f, _, out in frame_audio_times(plan) if out]
        assert shown == list(range(plan.num_frames))
        if len(plan) > 1:
            assert all(s.num_frames == segment_frames for s in plan.segments)
            assert all(s.start % 4 == 0 and s.keep_from >= overlap for s in plan.segments[1:])
            assert max(slice_misalignment(s.start, s.num_frames, s.token_start, s.num_tokens, fps)
                       for s in plan.segments) < 0.5


def test_segment_rule():
    assert segment_spans(81, 81, 9) == [(0, 81, 0)]
    assert segment_spans(45, 81, 9) == [(0, 45, 0)]
    # stride 72; the last segment ends on the last frame and re-makes what it shares with the one before
    assert segment_spans(161, 81, 9) == [(0, 81, 0), (72, 81, 9), (80, 81, 73)]
    assert segment_spans(153, 81, 9) == [(0, 81, 0), (72, 81, 9)]
    assert segment_spans(25, 13, 5) == [(0, 13, 0), (8, 13, 5), (12, 13, 9)]
    assert segment_spans(161, 81, 1) == [(0, 81, 0), (80, 81, 1)]
    for bad in [dict(segment_frames=80), dict(overlap=2), dict(overlap=81), dict(segment_frames=1)]:
        with pytest.raises(ValueError):
            segment_spans(161, **{"segment_frames": 81, "overlap": 9, **bad})


def test_a_recording_that_fits_one_segment_is_the_official_clip():
    plan = plan_for(3.0, 23)
    (seg,) = plan.segments
    assert (seg.start, seg.num_frames, seg.keep_from, seg.token_start) == (0, plan.num_frames, 0, 0)
    assert seg.num_tokens == seg.valid_tokens == plan.num_tokens  # every token, the official stretch kept
