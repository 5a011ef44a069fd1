"""Where a model computes: each one sits on the compute device only while it works (offloading).

The pipeline and the ComfyUI nodes move a model to the compute device for one stage and back to where it waits
(usually the CPU) afterwards, so at most one large model occupies the device at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Keep ``module`` on ``device`` inside the block and move it back where it was afterwards, even on error."""
    home = next(module.parameters()).device
    try:  # the move itself may fail half-way (out of memory): move back in every case
        module.to(device)
        yield module
    finally:
        module.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
