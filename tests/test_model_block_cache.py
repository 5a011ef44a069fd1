"""model.block_cache: one forward's first-block-cache decision, on stand-in blocks and on the tiny DiT."""

import pytest
import torch
from torch import nn

from fantasytalking_core.model.block_cache import BlockCacheCall, PassResiduals, relative_change, skipping_blocks


def test_relative_change_is_per_row():
    reference = torch.tensor([[[1.0, -1.0]], [[2.0, 2.0]]])  # [B=2, S=1, D=2]
    residual = torch.tensor([[[1.5, -1.0]], [[2.0, 2.0]]])
    assert relative_change(residual, reference).tolist() == [0.25, 0.0]


def run_blocks(call: BlockCacheCall, x: torch.Tensor, adds: list[float]) -> tuple[torch.Tensor, list[int]]:
    """Stand-in blocks (block i adds adds[i]) through ``call``; returns the output and the blocks computed."""
    computed = []

    def block(i):
        def compute(h):
            computed.append(i)
            return h + adds[i]
        return compute

    for i in range(len(adds)):
        x = call.run_block(i, i == len(adds) - 1, block(i), x)
    return x, computed


def test_hit_adds_each_rows_own_tail_and_miss_stores_it():
    state = {}
    x = torch.zeros(2, 3, 4)
    out, computed = run_blocks(BlockCacheCall(state, ["a", "b"], 0.1), x, [1.0, 2.0, 3.0])
    assert computed == [0, 1, 2] and torch.equal(out, x + 6)
    assert torch.equal(state["a"].tail, torch.full((1, 3, 4), 5.0))
    assert torch.equal(state["a"].first, torch.ones(1, 3, 4))

    state["b"] = PassResiduals(state["b"].first, torch.full((1, 3, 4), 50.0))  # b's tail differs from a's
    call = BlockCacheCall(state, ["a", "b"], 0.1)
    out, computed = run_blocks(call, x, [1.0, 2.0, 3.0])
    assert call.skipped and call.changes == [0.0, 0.0] and computed == [0]
    assert torch.equal(out[0], torch.full((3, 4), 6.0)) and torch.equal(out[1], torch.full((3, 4), 51.0))


def test_one_row_over_the_threshold_runs_the_whole_batch():
    state = {}
    run_blocks(BlockCacheCall(state, ["a", "b"], 0.1), torch.zeros(2, 1, 1), [1.0, 1.0])
    call = BlockCacheCall(state, ["a", "b"], 0.1)
    x = torch.zeros(2, 1, 1)
    block0 = [lambda h: h + torch.tensor([[[1.0]], [[1.5]]])]  # row b's block-0 residual changed by 50%
    out = call.run_block(0, False, block0[0], x)
    assert call.changes == [0.0, 0.5] and call.skipped is False
    out = call.run_block(1, True, lambda h: h + 1, out)
    assert out.flatten().tolist() == [2.0, 2.5] and state["b"].first.item() == 1.5  # stored afresh


def test_no_skip_where_skipping_is_not_allowed_and_a_batch_must_match():
    state = {}
    run_blocks(BlockCacheCall(state, ["a"], 0.5), torch.zeros(1, 1, 1), [1.0, 1.0])
    call = BlockCacheCall(state, ["a"], 0.5, allow_skip=False)
    assert run_blocks(call, torch.zeros(1, 1, 1), [1.0, 1.0])[1] == [0, 1] and call.changes == [0.0]
    with pytest.raises(ValueError, match="2 passes for a batch of 1 rows"):
        BlockCacheCall({}, ["a", "b"], 0.5).run_block(0, False, lambda h: h, torch.zeros(1, 1, 1))


def test_the_blocks_hold_the_call_only_during_the_forward(tiny_model):
    blocks = tiny_model.transformer.blocks
    call = BlockCacheCall({}, ["a"], 0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with skipping_blocks(blocks, call):
            assert [b.block_cache[1:] for b in blocks] == [(0, False), (1, True)]
            raise RuntimeError("boom")
    assert all("block_cache" not in b.__dict__ and b.block_cache is None for b in blocks)
    with pytest.raises(TypeError, match="cannot skip"):
        with skipping_blocks(nn.ModuleList([nn.Linear(1, 1)]), call):
            pass
