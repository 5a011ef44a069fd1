"""First-block cache for one DiT forward (FBCache: ParaAttention, diffusers' ``FirstBlockCacheConfig``), per pass.

Block 0 always runs. Its residual ``r = block0(x) - x`` is compared, row by row, with the residual the same guidance
pass had at its last step that ran every block: ``change = mean|r - r_ref| / mean|r_ref|``. When every row of the
batch changed less than the threshold (and skipping is allowed at this step), blocks 1..N-1 are skipped and each row
adds *its own* stored tail residual (last-block output - block-0 output of that step) to its block-0 output;
otherwise every block runs and each row's two residuals are stored under its pass. The reference is refreshed only
by a step that ran every block, as in ParaAttention and diffusers, so a run of skips cannot drift unnoticed.

A batch decides as one (all rows skip or none): a row is never given another row's residual, and a batch that runs
its blocks at all gains nothing from leaving rows out. :class:`BlockCacheCall` holds one forward's decision and
the state it reads and writes (a dict owned by the caller, keyed by pass); :func:`skipping_blocks` hands it to the
blocks for the duration of one forward and takes it back, also on error. Every block is still called as a module
(a skipped one returns its input at once), so offloading hooks see the usual sequence of blocks.

Shapes: B batch (one row per pass), S video tokens, D model width.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class PassResiduals:
    """What one pass stored at its last step that ran every block: ``first`` = block-0 output - input and ``tail``
    = last-block output - block-0 output, each [1, S, D] float32."""

    first: torch.Tensor
    tail: torch.Tensor


def relative_change(residual: torch.Tensor, reference: torch.Tensor,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[B] mean|residual - reference| / mean|reference| per row, in float32 (rows of [B, S, D]).

    ``group``: the ranks that hold the other tokens of these rows (context parallelism). Both sums are then summed
    over them first, so every rank gets the whole rows' change, as one process would (to rounding), and all of
    them decide alike: ranks that disagree would skip blocks whose collectives the others wait in.
    """
    reference = reference.float()
    sums = torch.stack([(residual.float() - reference).abs().flatten(1).sum(1), reference.abs().flatten(1).sum(1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)


class BlockCacheCall:
    """The first-block-cache decision of one DiT forward whose batch rows are the passes ``keys``.

    Args:
        state: pass key -> :class:`PassResiduals`, read for the reference and written when every block runs (the
            caller owns it, one per generation).
        keys: the pass of each batch row, in order.
        threshold: largest relative change of the block-0 residual that still reuses the stored tail (> 0).
        allow_skip: False on steps that must run every block (they still store their residuals).
    Attributes:
        sequence_group: the ranks holding the rest of this forward's tokens under context parallelism (set by the
            model's forward; None: this process has every token), over which the change is summed.
        changes: [B] relative change per row once block 0 ran (None while no reference exists).
        skipped: whether blocks 1..N-1 were skipped (None until block 0 ran).
    """

    def __init__(self, state: MutableMapping[Hashable, PassResiduals], keys: Sequence[Hashable], threshold: float,
                 allow_skip: bool = True):
        self.state, self.keys, self.threshold, self.allow_skip = state, tuple(keys), threshold, allow_skip
        self.sequence_group: dist.ProcessGroup | None = None
        self.changes: list[float] | None = None
        self.skipped: bool | None = None
        self._first_out: torch.Tensor | None = None
        self._first_residual: torch.Tensor | None = None

    def run_block(self, index: int, is_last: bool, compute: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
        """Block ``index`` of the forward on x [B, S, D]: ``compute(x)``, or what the cache gives instead."""
        if index == 0:
            out = compute(x)
            if len(self.keys) != out.shape[0]:
                raise ValueError(f"the cache call has {len(self.keys)} passes for a batch of {out.shape[0]} rows.")
            self._decide(out - x)
            if self.skipped:
                tail = torch.cat([self.state[key].tail for key in self.keys]).to(out.device)
                return (out.float() + tail).to(out.dtype)
            self._first_out = out
        elif self.skipped:
            return x
        else:
            out = compute(x)
        if is_last:
            self._store(out)
        return out

    def _decide(self, residual: torch.Tensor) -> None:
        stored = [self.state.get(key) for key in self.keys]
        if all(s is not None for s in stored):
            reference = torch.cat([s.first for s in stored]).to(residual.device)
            self.changes = relative_change(residual, reference, self.sequence_group).tolist()
        self.skipped = bool(self.allow_skip and self.changes is not None and max(self.changes) < self.threshold)
        if not self.skipped:
            self._first_residual = residual  # stored with the tail once the last block ran

    def _store(self, last_out: torch.Tensor) -> None:
        tail = last_out.float() - self._first_out.float()
        first = self._first_residual.float()
        for row, key in enumerate(self.keys):
            self.state[key] = PassResiduals(first[row:row + 1], tail[row:row + 1])
        self._first_out = self._first_residual = None  # a finished call keeps no tensors


@contextmanager
def skipping_blocks(blocks: nn.ModuleList, call: BlockCacheCall | None) -> Iterator[None]:
    """Give every block ``call`` (with its position) for the forwards inside the ``with``, and never after.

    The blocks must read ``block_cache`` (``model.precision.Float32IslandBlock`` does). ``call`` None does nothing.
    """
    if call is None:
        yield
        return
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        if not hasattr(type(block), "block_cache"):
            raise TypeError(f"block {index} ({type(block).__name__}) cannot skip: call use_float32_islands first.")
        block.block_cache = (call, index, index == last)
    try:
        yield
    finally:
        for block in blocks:
            del block.block_cache  # back to the class's None
