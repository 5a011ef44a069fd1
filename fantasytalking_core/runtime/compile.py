"""Regional ``torch.compile``: each DiT block compiled in place for one run, the rest of the model eager.

All 40 blocks share one class and one forward, so with ``torch.compile``'s default handling of built-in modules
(parameters are graph inputs, not constants) they share one compiled graph per input shape: the first pass pays
the compile (about 20 s for the 14B model on an H100), every later block, pass and step reuses it. What changes
between guidance passes reaches the block as tensors (the modulation, the audio windows and a per-pass audio
scale) or as the one branch switch ``AudioConditioning.is_silent`` (audio on / off: two graphs), so the passes of
a step never recompile. The batched mode's 3-row batch is another shape: one more graph.

Compilation is scoped to a run (:func:`compiled_blocks`): afterwards the blocks are eager again, so a later run
without it computes exactly as before. The compiled function itself is made once per backend and mode and kept
(:func:`_compiled_compute`), so a later run, or the next segment of a long recording, reuses the graphs instead of
compiling again, whatever the torch version's rules for matching a new ``torch.compile`` to old graphs. The audio
windows' valid lengths are part of a graph (the audio branch attends runs of equal windows, ``model/adapter.py``):
clips of one frame count share them, but a window cut short by the end of the recording (a long recording's last
segment) compiles once more. Results of a compiled run differ from eager ones by float rounding only
(inductor fuses elementwise work and may reorder reductions); ``docs/benchmarks.md`` records the difference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # eager / aot_eager: capture without code generation (tests)


def check_compile(enabled: bool, device_type: str, option: str = "--compile") -> None:
    """Refuse, before any model loads, compiling the blocks for a CUDA GPU without Triton (inductor's GPU code
    generator; the Windows builds of PyTorch come without it), instead of failing at the first step. ``option``:
    the setting as its user names it."""
    import importlib.util

    if enabled and device_type == "cuda" and importlib.util.find_spec("triton") is None:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f"{option} on a GPU needs Triton, which is not installed: pip install triton "
                                     f"(on Windows: pip install triton-windows), or turn {option} off.")


@contextmanager
def compiled_blocks(transformer: nn.Module, enabled: bool = True, backend: str = "inductor",
                    mode: str | None = None) -> Iterator[nn.Module]:
    """Inside the ``with``, every block of ``transformer`` computes through ``torch.compile`` (in place:
    parameters, buffers, state-dict keys and hooks such as diffusers' group offloading stay as they are).

    Args:
        transformer: a model with a ``blocks`` ModuleList (the DiT).
        enabled: False: a no-op, so callers need no branch.
        backend: ``torch.compile`` backend (:data:`COMPILE_BACKENDS`); mode: its ``mode`` (e.g. ``"max-autotune"``).
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {backend!r}.")
    if not enabled:
        yield transformer
        return
    blocks = list(transformer.blocks)
    if not all(callable(getattr(block, "compute", None)) for block in blocks):
        raise TypeError("compiled blocks need the float32-island block class (model.precision.use_float32_islands).")
    compiled = _compiled_compute(type(blocks[0]), backend, mode)
    try:
        # the block's own computation is compiled, not its call: the first-block cache's decision
        # (model/block_cache.py) and offloading hooks around it stay eager Python
        for block in blocks:
            block.compute = functools.partial(compiled, block)
        yield transformer
    finally:
        for block in blocks:
            block.__dict__.pop("compute", None)  # back to the class's method


@functools.cache
def _compiled_compute(block_class: type, backend: str, mode: str | None) -> Callable:
    """``block_class.compute`` compiled once per class, backend and mode: ``(block, *args) -> output``, static
    shapes (one graph per input shape, no symbolic shapes). The block is an argument, so every block and every run
    share its graphs."""
    return torch.compile(block_class.compute, backend=backend, mode=mode, dynamic=False)
