"""Where a loaded FantasyTalking model came from: what another process needs to load the same model.

A host that keeps one model in memory and spreads a run over worker processes (ComfyUI's sampler with a
``parallel`` layout, :mod:`~fantasytalking_core.runtime.pool`) cannot send a 14B model through a pipe; each
worker loads its own copy from the same files, the same way. :class:`ModelSource` holds those files and options
(picklable), and :meth:`ModelSource.load` is the one way both the host and the workers load them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.transformer import FantasyTalkingModel


@dataclass(frozen=True)
class ModelSource:
    """The files and options of one FantasyTalking model.

    Attributes:
        dit: the Wan2.1-I2V DiT (any format :func:`~.wan_dit.load_wan_dit` reads).
        adapter: the FantasyTalking adapter (``fantasytalking_model.ckpt`` or its safetensors repack).
        weight_dtype: the dtype the DiT's weights are kept in; None: as the file stores them, as ComfyUI's Load
            Diffusion Model keeps them: an fp8 file stays fp8 (upcast layer by layer, half the memory of bf16),
            GGUF stays quantized, anything else is kept in ``compute_dtype``.
        compute_dtype: the dtype the DiT computes in (bf16 official).
    """

    dit: str
    adapter: str
    weight_dtype: torch.dtype | None = None
    compute_dtype: torch.dtype = torch.bfloat16

    def load(self) -> FantasyTalkingModel:
        """The DiT with the adapter joined, on the CPU; its ``source`` is this."""
        from ..runtime.memory import check_host_memory
        from .adapter import load_audio_adapter
        from .wan_dit import load_wan_dit, loaded_bytes, stores_fp8

        check_host_memory(loaded_bytes(self.dit, self.weight_dtype, self.compute_dtype),
                          f"The DiT {Path(self.dit).name}", "weight_dtype fp8_e4m3fn keeps it in 8 bits (half of bf16), a GGUF file (Q8_0, Q6_K, ...) "
                          "in less; or close other programs, or add swap.")
        fp8 = self.weight_dtype is None and stores_fp8(self.dit)
        dit = load_wan_dit(self.dit, dtype=self.weight_dtype or self.compute_dtype, fp8_storage=fp8,
                           compute_dtype=self.compute_dtype)
        model = load_audio_adapter(self.adapter, dit)
        model.source = self
        return model
