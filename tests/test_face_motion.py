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


# A non-square frame and a face box that is not symmetric under an h/w swap: 48x80 pixels = 3x5 tokens per latent
# frame, the box covers token row 1, columns 2 and 3. Frame-major token index = frame * 15 + row * 5 + column.
HEIGHT, WIDTH, FRAMES = 48, 80, 2
BOX = (32, 16, 64, 32)  # x0, y0, x1, y1 in pixels
FACE_TOKENS = [7, 8, 22, 23]


def test_intensities_change_the_audio_branch_only_where_they_should(tiny_model):
    block = tiny_model.transformer.blocks[0]
    proc: FantasyTalkingAttnProcessor = block.attn2.processor
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, FRAMES * 15, 64, generator=g)
    context = torch.randn(1, 257 + 512, 64, generator=g)
    windows = torch.randn(1, FRAMES, 17, 32, generator=g)
    k_lens = torch.tensor([6, 14])

    def out(scale):
        proc.conditioning = AudioConditioning(windows, k_lens, scale)
        try:
            return block.attn2(hidden, context)
        finally:
            proc.conditioning = None

    with torch.no_grad():
        base, full = out(0.0), out(1.0)
        scale = audio_scale_map(MotionIntensity(face=1.0, body=0.0), 1.0, FRAMES, HEIGHT, WIDTH, BOX)
        mixed = out(scale.unsqueeze(0))
    face_tokens = scale.nonzero().flatten()
    assert face_tokens.tolist() == FACE_TOKENS
    body = torch.ones(FRAMES * 15, dtype=torch.bool)
    body[face_tokens] = False
    torch.testing.assert_close(mixed[:, body], base[:, body])  # body intensity 0: no audio outside the face
    torch.testing.assert_close(mixed[:, face_tokens] - base[:, face_tokens], 1.5 * (full - base)[:, face_tokens],
                               rtol=1e-4, atol=1e-5)


def test_the_scale_map_lands_where_the_dit_puts_the_face_pixels(tiny_model, official_inputs):
    """Through the whole DiT on a non-square latent: block 0's audio branch acts exactly on the tokens whose
    pixels the face box covers (the DiT's own patch order, not the map's, decides where a token is)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, FRAMES, HEIGHT // 8, WIDTH // 8, generator=g)
    y = torch.randn(1, 20, FRAMES, HEIGHT // 8, WIDTH // 8, generator=g)
    windows = torch.randn(1, FRAMES, 17, 32, generator=g)
    scale = audio_scale_map(MotionIntensity(face=1.0, body=0.0), 1.0, FRAMES, HEIGHT, WIDTH, BOX)
    captured = []
    hook = tiny_model.transformer.blocks[0].attn2.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            for s in (0.0, scale.unsqueeze(0)):
                tiny_model(x, official_inputs["timestep"], official_inputs["context_pos"],
                           official_inputs["clip_feature"], y, AudioConditioning(windows, torch.tensor([6, 14]), s))
    finally:
        hook.remove()
    moved = (captured[1] - captured[0]).abs().amax(dim=-1)[0] > 0  # [S]: tokens the audio branch changed
    expected = torch.zeros(FRAMES, HEIGHT // 16, WIDTH // 16, dtype=torch.bool)
    expected[:, 1, 2:4] = True  # pixel rows 16..32, columns 32..64
    assert torch.equal(moved.view(FRAMES, HEIGHT // 16, WIDTH // 16), expected)
