"""fantasytalking_core.audio.rules: the official frame, crop and token-count rules, against infer.py's values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

from fantasytalking_core.audio.rules import crop_for_frames, crop_samples_for_frames, frames_for_duration, wav2vec2_num_tokens


# =====================================================================================================================
# Official rules (golden values in tests/fixtures/official/windows.json)
# =====================================================================================================================


def test_frame_rule_matches_every_official_golden_case(official_dir):
    rule = json.loads((official_dir / "windows.json").read_text())["frame_rule"]
    assert len(rule["results"]) > 100
    for case in rule["results"]:
        got = frames_for_duration(case["duration_s"], case["fps"], case["max_num_frames"])
        assert got == case["num_frames"], case


@pytest.mark.parametrize("fps", [23, 16, 24, 25, 23.976])
def test_video_never_outlasts_audio_by_more_than_the_rule_allows(fps):
    for duration in np.linspace(0.0, 12.0, 997):
        n = frames_for_duration(float(duration), fps, max_frames=None)
        assert (n - 1) % 4 == 0
        # The rule rounds fps*duration down to a multiple of 4 and adds 5: the video is 1..5 frames longer.
        assert fps * duration < n <= fps * duration + 5 + 1e-9
        capped = frames_for_duration(float(duration), fps, max_frames=81)
        assert capped == min(n, 81)


def test_frame_rule_without_cap_and_defaults():
    assert frames_for_duration(600.0, 23, None) == 13805
    assert frames_for_duration(600.0) == 81  # fps 23, max 81 by default
    assert frames_for_duration(0.0) == 5


@pytest.mark.parametrize(
    "kwargs", [dict(fps=0), dict(fps=-23), dict(fps=float("nan")), dict(duration_s=-0.1), dict(duration_s=float("inf")),
               dict(max_frames=80), dict(max_frames=1), dict(max_frames=82.5)]
)
def test_frame_rule_rejects_bad_arguments(kwargs):
    args = dict(duration_s=1.0, fps=23, max_frames=81) | kwargs
    with pytest.raises(ValueError):
        frames_for_duration(**args)


def test_crop_and_token_count_match_every_official_case(official_dir):
    data = json.loads((official_dir / "windows.json").read_text())
    cases = [c for c in data["cases"] if c["audio_samples_16k"] is not None]
    assert len(cases) >= 30
    seen_lengths = {}
    for c in cases:
        wave = torch.zeros(c["audio_samples_16k"])
        cropped = crop_for_frames(wave, c["num_frames"], data["fps"])
        assert cropped.shape[0] == c["wav2vec_input_samples"], c
        assert wav2vec2_num_tokens(cropped.shape[0]) == c["audio_tokens"], c
        seen_lengths[cropped.shape[0]] = c["audio_tokens"]
    # The formula is what the real conv stack does (base's kernels and strides, 1 channel wide for speed).
    conv_stack = Wav2Vec2FeatureEncoder(Wav2Vec2Config(conv_dim=(1,) * 7)).eval()
    with torch.no_grad():
        for samples, tokens in seen_lengths.items():
            assert conv_stack(torch.zeros(1, samples)).shape[-1] == tokens


def test_token_count_edges():
    assert [wav2vec2_num_tokens(n) for n in (0, 399, 400, 719, 720, 16000)] == [0, 0, 1, 1, 2, 49]
    assert crop_samples_for_frames(81, 23) == int(81 / 23 * 16000) == 56347
