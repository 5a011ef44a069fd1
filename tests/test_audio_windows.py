import json

import pytest
import torch

from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows, latent_frame_count

CASES = json.loads((__import__("pathlib").Path(__file__).parent / "fixtures/official/windows.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c['num_frames']}-L{c['audio_tokens']}-{c['case']}")
def test_windows_equal_official_exactly(case):
    w = audio_windows_for_frames(case["audio_tokens"], case["num_frames"])
    assert [list(r) for r in w.pos_idx_ranges] == case["pos_idx_ranges"]
    assert [list(r) for r in w.expanded_ranges] == case["expanded_ranges"]
    assert list(w.k_lens) == case["k_lens"]
    assert [list(r) for r in w.token_indices] == case["window_token_indices"]
    assert (w.half_tokens, w.window_len, w.tokens_per_frame) == (case["half_tokens"], case["window_len"], case["tokens_per_frame"])


def test_gather_keeps_valid_tokens_first_and_zero_pads_the_end():
    w = audio_windows_for_frames(36, 17)
    tokens = torch.arange(1, 37, dtype=torch.float32).view(1, 36, 1).expand(2, 36, 3)  # token i holds i+1
    out = gather_audio_windows(tokens, w)
    assert out.shape == (2, latent_frame_count(17), w.window_len, 3)
    for f, (k_len, (start, _)) in enumerate(zip(w.k_lens, w.expanded_ranges)):
        first = max(start, 0) + 1
        assert out[0, f, :k_len, 0].tolist() == list(range(first, first + k_len))
        assert out[:, f, k_len:].abs().sum() == 0  # padding always at the end, zeros


def test_windows_refuse_bad_lengths():
    with pytest.raises(ValueError, match="4n\\+1"):
        audio_windows_for_frames(36, 16)
    with pytest.raises(ValueError, match="no wav2vec2 token"):
        audio_windows_for_frames(0, 17)
    with pytest.raises(ValueError, match="made for 36"):
        gather_audio_windows(torch.zeros(1, 35, 4), audio_windows_for_frames(36, 17))
