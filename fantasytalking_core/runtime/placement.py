"""Where a model computes: each one sits on the compute device only while it works (offloading).

The pipeline and the ComfyUI nodes move a model to the compute device for one stage and back to where it waits
(usually the CPU) afterwards, so at most one large model occupies the device at a time (:func:`on_device`). For a
DiT too large for the device, :func:`streamed_blocks` keeps its weights on the CPU and brings one block at a time,
prefetched on a side CUDA stream (diffusers' block-level group offloading): on an H100 the 14B model then peaks at
4.5 GiB for 27% more time per pass (``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model.transformer import FantasyTalkingModel

PLACEMENTS = ("resident", "streamed")
"""How the DiT computes: ``resident`` (all on the device while sampling), ``streamed`` (block by block)."""
_OFFLOAD_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker")


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


@contextmanager
def streamed_blocks(model: FantasyTalkingModel, device: torch.device) -> Iterator[FantasyTalkingModel]:
    """Run ``model`` on ``device`` with its DiT weights left on the CPU, one block onloaded at a time.

    Inside the block the transformer carries diffusers' block-level group offloading hooks (one block per group;
    on CUDA the next block is copied on a side stream while the current one computes, from pinned CPU memory);
    the audio projection, a few MB, sits on ``device``; ``model.execution_device`` says where inputs go. On exit,
    also on error, the hooks are removed, everything is back on the CPU and the model is as it was.
    """
    from diffusers.hooks import HookRegistry, apply_group_offloading

    cpu = torch.device("cpu")
    device = torch.device(device)
    model.to(cpu)
    registry = None
    try:
        apply_group_offloading(model.transformer, onload_device=device, offload_device=cpu,
                               offload_type="block_level", num_blocks_per_group=1, use_stream=device.type == "cuda")
        registry = HookRegistry.check_if_exists_or_initialize(model.transformer)
        model.audio_proj.to(device)
        model.execution_device = device
        yield model
    finally:
        model.execution_device = None
        if registry is not None:
            for name in _OFFLOAD_HOOKS:
                registry.remove_hook(name, recurse=True)
        model.to(cpu)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def dit_on_device(model: FantasyTalkingModel, device: torch.device, placement: str = "resident"
                  ) -> Iterator[FantasyTalkingModel]:
    """The DiT ready to sample on ``device``: its LoRAs (``model.loras``) applied, then moved there whole
    (``resident``) or streamed block by block; afterwards as it was (no LoRA layers, where it waits)."""
    from ..loaders.lora import applied_loras

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if torch.device(device).type == "mps" and any(p.dtype.itemsize == 1 and p.dtype.is_floating_point
                                                  for p in model.transformer.parameters()):
        from ..errors import SettingsError

        raise SettingsError("The DiT's weights are kept in 8 bits (fp8), which Apple's GPUs (MPS) cannot hold: load "
                            "it with weight_dtype default, bf16 or fp16.")
    # LoRA layers first, on the device the weights wait on, so that they move (or stream) with their blocks
    with (applied_loras(model.transformer, model.loras, model.dtype),
          streamed_blocks(model, device) if placement == "streamed" else on_device(model, device) as placed):
        yield placed

