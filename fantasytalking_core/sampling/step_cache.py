"""Step caching, opt-in: a first-block cache (FBCache) kept per guidance pass, for one generation.

A step may reuse most of a pass's previous DiT computation: block 0 runs, and when its residual changed by less than
``threshold`` (relative mean absolute change, see ``model/block_cache.py``) since that pass last ran every block,
blocks 1..N-1 are skipped and their stored residual is added instead. Each pass (negative; positive; positive +
audio) has its own residuals, so a pass never reuses another pass's (diffusers' PAB and FasterCache keep one state
for all passes and are not offered). The first :data:`FIRST_STEPS` and the last :data:`LAST_STEPS` steps always run
every block: the first lay out the video, the last its fine detail. 0 turns caching off (the sampler then never
builds a :class:`StepCache`, and the run is the uncached run bit for bit).

A :class:`StepCache` lives for one generation: made by ``denoise.generate_latents``, passed explicitly to the
velocity function, dropped at the end; nothing is kept on the model between forwards.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from ..errors import SettingsError
from ..model.block_cache import BlockCacheCall, PassResiduals

FIRST_STEPS = 3  # steps at the start that always run every block
LAST_STEPS = 2  # steps at the end that always run every block
MAX_THRESHOLD = 1.0  # a relative change of 100%: beyond it the cache would reuse residuals of unrelated steps


def check_step_cache(threshold: float, name: str = "step_cache") -> float:
    """``threshold`` as a float if it is a number in [0, 1] (0 = off), else SettingsError naming ``name``."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= MAX_THRESHOLD:  # also refuses NaN
        raise SettingsError(f"{name} must be a number from 0 (off) to {MAX_THRESHOLD:g} (typical 0.05-0.1), got "
                            f"{threshold!r}.")
    return value


def check_cache_can_skip(threshold: float, num_steps: int, name: str = "step_cache") -> None:
    """Refuse a step cache in a run too short for it to skip anything (SettingsError naming ``name``): its first
    :data:`FIRST_STEPS` and last :data:`LAST_STEPS` steps always compute every block, so in a step-distilled 4-step
    run it would only store residuals, and say nothing."""
    if threshold > 0 and num_steps <= FIRST_STEPS + LAST_STEPS:
        raise SettingsError(f"{name} skips nothing in a {num_steps}-step run: the first {FIRST_STEPS} and last "
                            f"{LAST_STEPS} steps always compute every block. Set {name} to 0, or sample more than "
                            f"{FIRST_STEPS + LAST_STEPS} steps.")


class StepCache:
    """Per-generation first-block-cache state: one :class:`PassResiduals` per guidance pass.

    Args:
        threshold: relative change of the block-0 residual below which a pass reuses its stored residual, in
            (0, 1]; typical 0.05-0.1.
        num_steps: steps of the run.
        first_steps, last_steps: steps at each end that always run every block.
    Attributes:
        residuals: pass -> what it stored at its last step that ran every block.
        calls: (step, :class:`BlockCacheCall`) of every forward, in order: passes, relative changes, decisions.
    """

    def __init__(self, threshold: float, num_steps: int, first_steps: int = FIRST_STEPS,
                 last_steps: int = LAST_STEPS):
        self.threshold = check_step_cache(threshold, "threshold")
        if self.threshold == 0:
            raise SettingsError("a StepCache needs a threshold above 0; for no caching pass no cache.")
        if min(num_steps, first_steps, last_steps) < 0:
            raise SettingsError(f"num_steps, first_steps and last_steps must be >= 0, got {num_steps}, "
                                f"{first_steps}, {last_steps}.")
        self.num_steps, self.first_steps, self.last_steps = num_steps, first_steps, last_steps
        self.residuals: dict[Hashable, PassResiduals] = {}
        self.calls: list[tuple[int, BlockCacheCall]] = []

    def may_skip(self, step: int) -> bool:
        """Whether step ``step`` (0-based) lies outside the protected first and last steps."""
        return self.first_steps <= step < self.num_steps - self.last_steps

    def call(self, step: int, passes: Sequence[Hashable]) -> BlockCacheCall:
        """The cache of one DiT forward at ``step`` whose batch rows are ``passes`` (recorded in :attr:`calls`)."""
        call = BlockCacheCall(self.residuals, passes, self.threshold, self.may_skip(step))
        self.calls.append((step, call))
        return call

    def skipped_fraction(self, num_blocks: int) -> float:
        """The fraction of block computations (one per block, pass and step) the cache skipped."""
        rows = sum(len(call.keys) for _, call in self.calls)
        skipped = sum(len(call.keys) for _, call in self.calls if call.skipped)
        return skipped * (num_blocks - 1) / (rows * num_blocks) if rows else 0.0
