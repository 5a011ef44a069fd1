import pytest
import torch

from fantasytalking_core.model.adapter import (AudioBlockKV, AudioConditioning, AudioProjModel, TokenLayoutError,
                                              TokenShard, _scale_for,
                                              audio_cross_attention, token_shard, window_runs)
from fantasytalking_core.model import adapter as adapter_module


def qkv(batch=1, frames=3, per_frame=4, width=5, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, frames * per_frame, heads, dim, generator=g)
    k = torch.randn(batch, frames, width, heads, dim, generator=g)
    v = torch.randn(batch, frames, width, heads, dim, generator=g)
    return q, k, v


def test_each_frame_attends_only_its_own_window():
    q, k, v = qkv()
    out = audio_cross_attention(q, k, v, None)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1], v2[:, 1] = torch.randn_like(k[:, 1]), torch.randn_like(v[:, 1])  # change frame 1's window only
    out2 = audio_cross_attention(q, k2, v2, None)
    assert torch.equal(out[:, :4], out2[:, :4]) and torch.equal(out[:, 8:], out2[:, 8:])
    assert not torch.allclose(out[:, 4:8], out2[:, 4:8])


def test_masked_slots_are_ignored_and_unmasked_are_not():
    q, k, v = qkv()
    k_lens = torch.tensor([2, 5, 3])
    k2, v2 = k.clone(), v.clone()
    k2[:, 0, 2:], v2[:, 0, 2:] = 7.0, 7.0  # only padded slots of frame 0 change
    torch.testing.assert_close(audio_cross_attention(q, k, v, k_lens), audio_cross_attention(q, k2, v2, k_lens))
    assert not torch.allclose(audio_cross_attention(q, k, v, None), audio_cross_attention(q, k2, v2, None))
    # the masked result equals attention over the valid prefix alone
    ref = audio_cross_attention(q[:, :4], k[:, :1, :2], v[:, :1, :2], None)
    torch.testing.assert_close(audio_cross_attention(q, k, v, k_lens)[:, :4], ref)


def test_empty_window_contributes_zero_not_nan():
    q, k, v = qkv()
    out = audio_cross_attention(q, k, v, torch.tensor([0, 5, 5]))
    assert torch.isfinite(out).all() and out[:, :4].abs().max() == 0


def masked_reference(q, k, v, k_lens):
    """The masked per-frame attention the runs must equal: every slot of a window, padding masked out."""
    batch, seq, heads, dim = q.shape
    frames, width = k.shape[1:3]
    lens = k_lens.expand(batch, frames).reshape(-1, 1, 1, 1)
    mask = torch.arange(width).view(1, 1, 1, width) < lens
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(batch * frames, seq // frames, heads, dim).transpose(1, 2),
        k.reshape(batch * frames, width, heads, dim).transpose(1, 2),
        v.reshape(batch * frames, width, heads, dim).transpose(1, 2), attn_mask=mask)
    out = torch.nan_to_num(out) * (lens > 0)
    return out.transpose(1, 2).reshape(batch, seq, heads, dim)


def test_window_runs_group_consecutive_frames_of_equal_length():
    assert window_runs([3, 9, 9, 9, 5, 5, 0]) == ((0, 1, 3), (1, 4, 9), (4, 6, 5), (6, 7, 0))
    assert window_runs([9, 4, 9]) == ((0, 1, 9), (1, 2, 4), (2, 3, 9))  # equal lengths apart stay apart
    assert window_runs([]) == ()


@pytest.mark.parametrize("k_lens", [[5, 5, 5, 5], [2, 5, 5, 3], [0, 5, 1, 1], [[2, 5, 5, 3], [2, 5, 5, 3]],
                                    [[2, 5, 5, 3], [5, 0, 4, 4]]])
def test_runs_of_valid_slots_equal_masked_attention(k_lens):
    q, k, v = qkv(batch=2, frames=4, per_frame=3)
    k_lens = torch.tensor(k_lens)
    out = audio_cross_attention(q, k, v, k_lens)
    torch.testing.assert_close(out, masked_reference(q, k, v, k_lens), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(audio_cross_attention(q, k, v, k_lens.tolist()), out, atol=0, rtol=0)


def test_audio_branch_runs_unmasked_on_the_attention_it_is_given():
    # the block's processor (test_runtime_attention) and ComfyUI's route (test_model_wan_native) each give theirs
    calls = []

    def recording(query, key, value):
        calls.append(key.shape[1])
        return adapter_module.dispatch_attention_fn(query, key, value, backend="_native_math")

    heads, dim, frames, per_frame = 2, 8, 3, 4
    kv = AudioBlockKV(16, heads * dim)
    windows = torch.randn(1, frames, 6, 16)
    cond = AudioConditioning(windows, torch.tensor([4, 6, 6]), 1.0, tokens_per_frame=per_frame)
    q = torch.randn(1, frames * per_frame, heads, dim)
    out = kv(q, cond, None, recording)
    assert calls == [4, 6]  # one call per run of equal windows, over their valid slots only
    keys = kv.k_proj(windows).unflatten(-1, (heads, dim))
    values = kv.v_proj(windows).unflatten(-1, (heads, dim))
    torch.testing.assert_close(out, masked_reference(q, keys, values, torch.tensor([4, 6, 6])), atol=1e-6, rtol=1e-5)


def test_scale_shapes_broadcast_per_row_and_per_token():
    out = torch.ones(2, 6, 2, 4)
    assert _scale_for(0.5, out) == 0.5
    assert (out * _scale_for(torch.tensor([0.0, 2.0]), out))[:, :, 0, 0].tolist() == [[0.0] * 6, [2.0] * 6]
    per_token = torch.arange(12, dtype=torch.float32).view(2, 6)
    assert torch.equal((out * _scale_for(per_token, out))[..., 0, 0], per_token)
    assert AudioConditioning(torch.zeros(1), None, torch.zeros(2, 6)).is_silent()
    assert not AudioConditioning(torch.zeros(1), None, torch.tensor([0.0, 1e-3])).is_silent()


def test_projection_is_linear_without_bias_then_layernorm():
    proj = AudioProjModel(768, 32)
    assert proj.proj.bias is None and proj.norm.normalized_shape == (32,)
    x = torch.randn(1, 7, 768)
    torch.testing.assert_close(proj(x), torch.nn.functional.layer_norm(x @ proj.proj.weight.T, (32,), proj.norm.weight, proj.norm.bias))


def test_block_kv_term_is_scaled_and_casts_stored_weights_to_the_query():
    """ComfyUI may keep the adapter in its stored dtype beside a DiT computing in another: the k/v weights follow
    the query's dtype, and the term is the per-frame attention times the scale (None when silent)."""
    g = torch.Generator().manual_seed(3)
    kv = AudioBlockKV(8, 12)
    query = torch.randn(2, 2 * 5, 3, 4, generator=g)
    windows = torch.randn(1, 2, 6, 8, generator=g)
    k_lens = torch.tensor([4, 6])
    with torch.no_grad():
        full = kv(query, AudioConditioning(windows, k_lens, 1.0))
        keys = kv.k_proj(windows).unflatten(-1, (3, 4)).expand(2, -1, -1, -1, -1)
        values = kv.v_proj(windows).unflatten(-1, (3, 4)).expand(2, -1, -1, -1, -1)
        assert torch.equal(full, audio_cross_attention(query, keys, values, k_lens))
        half = kv(query, AudioConditioning(windows, k_lens, torch.tensor([0.5, 0.0])))
        assert torch.equal(half[0], full[0] * 0.5) and not half[1].any()
        assert kv(query, AudioConditioning(windows, k_lens, 0.0)) is None and kv(query, None) is None
        stored_bf16 = AudioBlockKV(8, 12).to(torch.bfloat16)
        stored_bf16.load_state_dict(kv.to(torch.bfloat16).state_dict())
        as_fp32 = AudioBlockKV(8, 12)
        as_fp32.load_state_dict({k: v.float() for k, v in stored_bf16.state_dict().items()})
        cond = AudioConditioning(windows, k_lens, 1.0)
        assert torch.equal(stored_bf16(query, cond), as_fp32(query, cond))


def sharded(world: int, total: int, tokens_per_frame: int) -> list[tuple[int, int]]:
    """(offset, length) of each rank's slice, as diffusers' tensor_split sharder cuts ``total`` tokens."""
    sizes = [len(c) for c in torch.arange(total).tensor_split(world)]
    return [(sum(sizes[:r]), sizes[r]) for r in range(world)]


def test_token_shard_matches_the_context_parallel_split_and_refuses_another():
    # 60 tokens over 7 ranks: 9, 9, 9, 9, 8, 8, 8 (tensor_split), equal slices when it divides (chunk)
    assert [token_shard(r, 7, n, 60, 15).offset for r, (_, n) in enumerate(sharded(7, 60, 15))] == \
        [0, 9, 18, 27, 36, 44, 52]
    assert token_shard(2, 3, 20, 60, 15) == TokenShard(40, 60, 15)
    assert TokenShard(40, 60, 15).frame_range(20) == (2, 4) and TokenShard(20, 60, 15).frame_range(20) == (1, 3)
    with pytest.raises(TokenLayoutError, match="rank 1 of 3 holds 21 video tokens; splitting 60 tokens gives it 20"):
        token_shard(1, 3, 21, 60, 15)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_a_shard_gets_exactly_what_the_whole_sequence_gives_its_tokens(world):
    """Non-square frames (3 x 5 patches = 15 tokens), 4 frames, seams in the middle of frames (3 and 7 ranks),
    masked windows with an empty one, a per-token scale map: every rank's slice equals the unsharded result's."""
    g = torch.Generator().manual_seed(5)
    frames, per_frame, heads, dim = 4, 15, 2, 4
    kv = AudioBlockKV(8, heads * dim)
    query = torch.randn(2, frames * per_frame, heads, dim, generator=g)
    windows = torch.randn(1, frames, 6, 8, generator=g)
    k_lens = torch.tensor([4, 6, 0, 3])
    scale = torch.rand(2, frames * per_frame, generator=g) + 0.5  # [B, S]: one strength per token
    with torch.no_grad():
        whole = kv(query, AudioConditioning(windows, k_lens, scale, tokens_per_frame=per_frame))
        parts = []
        for rank, (offset, length) in enumerate(sharded(world, frames * per_frame, per_frame)):
            shard = token_shard(rank, world, length, frames * per_frame, per_frame)
            assert shard.offset == offset
            cond = AudioConditioning(windows, k_lens, scale, tokens_per_frame=per_frame)
            parts.append(kv(query[:, offset:offset + length], cond, shard))
    seams = [offset % per_frame for offset, _ in sharded(world, frames * per_frame, per_frame)[1:]]
    assert world == 2 or any(seams), "the case must cut a frame"
    assert torch.equal(torch.cat(parts, dim=1), whole)  # exact: attention rows are independent
    assert whole[:, 2 * per_frame:3 * per_frame].abs().max() == 0  # the empty window adds nothing
    # the per-token scale is sliced with the shard: scaling one token of the last shard changes only that token
    offset, length = sharded(world, frames * per_frame, per_frame)[-1]
    bumped = scale.clone()
    bumped[:, offset] *= 2
    with torch.no_grad():
        part = kv(query[:, offset:], AudioConditioning(windows, k_lens, bumped, tokens_per_frame=per_frame),
                  token_shard(world - 1, world, length, frames * per_frame, per_frame))
    torch.testing.assert_close(part[:, 0], 2 * parts[-1][:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(part[:, 1:], parts[-1][:, 1:], rtol=0, atol=1e-6)


def test_a_slice_without_its_shard_raises_instead_of_regrouping_frames():
    """Half of 4 frames x 6 tokens splits evenly into 4 'frames' of 3 tokens: without the guard the branch would
    silently attend the wrong windows (the multi-GPU bug this guards against)."""
    q, k, v = qkv(frames=4, per_frame=6)
    with pytest.raises(TokenLayoutError, match="12 video tokens are not 4 latent frames x 6 tokens per frame"):
        audio_cross_attention(q[:, :12], k, v, None, tokens_per_frame=6)
    assert torch.equal(audio_cross_attention(q, k, v, None, tokens_per_frame=6), audio_cross_attention(q, k, v, None))
    with pytest.raises(TokenLayoutError, match="does not fit 4 latent frames x 6 tokens = 24"):
        audio_cross_attention(q[:, :12], k, v, None, shard=TokenShard(18, 24, 6))
