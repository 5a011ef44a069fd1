"""Motion intensity: where the per-token audio scale lands, what it changes, and that defaults change nothing."""

import pytest
import torch

from fantasytalking_core.model.adapter import AudioConditioning, FantasyTalkingAttnProcessor
from fantasytalking_core.face.motion import (MotionIntensity, audio_cfg_for, audio_scale_map, face_coverage,
                                        intensity_to_multiplier)


def test_mapping_is_monotonic_with_the_documented_anchors():
    values = [intensity_to_multiplier(i / 20) for i in range(21)]
    assert values == sorted(values)
    assert (intensity_to_multiplier(0), intensity_to_multiplier(0.5), intensity_to_multiplier(1)) == (0.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="face intensity"):
        MotionIntensity(face=1.2)


@pytest.mark.parametrize("height,width", [(64, 64), (48, 96), (96, 32)])
def test_face_region_lands_on_the_right_tokens(height, width):
    box = (16, 16, 32, 48)  # x 16..32, y 16..48: token column 1, token rows 1..2
    cover = face_coverage(box, height, width)
    assert cover.shape == (height // 16, width // 16)
    expected = torch.zeros_like(cover)
    expected[1:3, 1] = 1
    assert torch.equal(cover, expected)
    m = audio_scale_map(MotionIntensity(face=1.0, body=0.0), 1.0, 3, height, width, box)
    per_frame = cover.numel()
    assert m.shape == (3 * per_frame,)
    grid = m.view(3, height // 16, width // 16)
    assert torch.equal(grid, (expected * 1.5).expand(3, -1, -1))  # frame-major, same in every latent frame


def test_partly_covered_tokens_blend():
    cover = face_coverage((8, 0, 24, 16), 32, 32)  # half of token (0,0), half of token (0,1)
    assert cover[0].tolist() == [0.5, 0.5] and cover[1].tolist() == [0.0, 0.0]
    m = audio_scale_map(MotionIntensity(face=1.0, body=0.5), 2.0, 1, 32, 32, (8, 0, 24, 16))
    assert m.tolist() == [2.5, 2.5, 2.0, 2.0]


def test_defaults_and_no_motion_give_the_plain_scale():
    assert audio_scale_map(MotionIntensity(), 0.7, 5, 64, 64, (0, 0, 16, 16)) == 0.7
    assert audio_scale_map(None, 0.7, 5, 64, 64) == 0.7
    assert audio_cfg_for(MotionIntensity(face=1.0, body=1.0), 4.0) == 4.0  # only when asked
    assert audio_cfg_for(MotionIntensity(face=1.0, body=0.0, affect_audio_cfg=True), 4.0) == 4.0 * 0.75


def test_intensities_change_the_audio_branch_only_where_they_should(tiny_model, official_inputs):
    block = tiny_model.transformer.blocks[0]
    proc: FantasyTalkingAttnProcessor = block.attn2.processor
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 45, 64, generator=g)  # 5 latent frames of 3x3 tokens
    context = torch.randn(1, 257 + 512, 64, generator=g)
    windows = torch.randn(1, 5, 17, 32, generator=g)
    k_lens = torch.tensor([6, 14, 17, 17, 14])

    def out(scale):
        proc.conditioning = AudioConditioning(windows, k_lens, scale)
        try:
            return block.attn2(hidden, context)
        finally:
            proc.conditioning = None

    with torch.no_grad():
        base, full = out(0.0), out(1.0)
        scale = audio_scale_map(MotionIntensity(face=1.0, body=0.0), 1.0, 5, 48, 48, (0, 0, 16, 16))  # token (0,0)
        mixed = out(scale.unsqueeze(0))
    face_tokens = scale.nonzero().flatten()
    assert face_tokens.tolist() == [0, 9, 18, 27, 36]  # the first token of every latent frame
    body = torch.ones(45, dtype=torch.bool)
    body[face_tokens] = False
    torch.testing.assert_close(mixed[:, body], base[:, body])  # body intensity 0: no audio outside the face
    torch.testing.assert_close(mixed[:, face_tokens] - base[:, face_tokens], 1.5 * (full - base)[:, face_tokens],
                               rtol=1e-4, atol=1e-5)
