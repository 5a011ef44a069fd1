"""Will the DiT fit? An estimate of its GPU memory for one run, checked before any model moves to the GPU.

Weights: the bytes of the parameters that sit on the device (all of them when resident; two blocks plus the
embeddings and head when streamed, one block computing while the next is prefetched). Activations: per video token
and batch row, the FFN's hidden activation in the compute dtype twice (input and output of the GELU) and three
float32 model-width tensors (residual stream, its normed and modulated copy, the block output):
``2 * ffn_dim * e + 3 * dim * 4`` bytes. For the 14B model that is 114 KiB per token; on an H100 the measured
activations were 2.3 GiB for 21,504 tokens and 8.0 GiB for 75,600 (109-111 KiB per token, ``docs/benchmarks.md``).
Attention runs through fused kernels whose memory grows with the tokens, not their square. In a run over several
processes (``runtime/parallel.py``) each process needs the activations of its share of the tokens and passes, and
with ``fsdp`` its share of the blocks' weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import FantasyTalkingError, SettingsError

GIB = 1024**3
MARGIN = 1.02  # the small tensors the model above does not count (fragmentation: see use_expandable_segments)
RESERVE = GIB // 2  # CUDA context, cuBLAS/cuDNN workspaces
ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""Where a user configures PyTorch's allocator (the second is the older name, still the one CUDA honours in 2.9)."""


class InsufficientMemoryError(FantasyTalkingError, MemoryError):
    """The run needs more GPU memory than is free; the message names the options."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one run needs on the device."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return int((self.weights + self.activations) * MARGIN) + RESERVE


def use_expandable_segments(device: torch.device) -> bool:
    """Let PyTorch's CUDA caching allocator grow segments in place (``expandable_segments``) for a run on
    ``device``, unless the user configured the allocator (:data:`ALLOCATOR_ENV`); True when it was turned on.

    Why: with fixed segments a streamed 720x1280 pass of the 14B model ran out of memory under a 12 GiB cap with
    3 GiB reserved but unused between blocks of different sizes; with expandable segments it ran (peak 9.7 GiB
    allocated, estimate 10.2; ``docs/benchmarks.md``). Call it before the run's first CUDA allocation; ComfyUI sets
    its own allocator (``cudaMallocAsync``), so only the command line calls it.
    """
    if torch.device(device).type != "cuda" or torch.version.cuda is None:
        return False
    if any(os.environ.get(name) for name in ALLOCATOR_ENV):
        return False  # the user's choice
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    return True


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (fp8 and GGUF weights count their real storage)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)  # GGUF weights are uint8 blocks: their bytes


def bytes_on(module: torch.nn.Module, device: torch.device) -> int:
    """Bytes of ``module``'s parameters and buffers that are stored on ``device`` now (a sharded weight counts its
    local shard)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in [*module.parameters(), *module.buffers()]]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == device)


def video_tokens(num_frames: int, height: int, width: int) -> int:
    """DiT tokens of a video: latent frames x (height / 16) x (width / 16) (VAE 4x8x8, patch 1x2x2)."""
    return ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def estimate_dit_memory(transformer: torch.nn.Module, num_frames: int, height: int, width: int, batch_rows: int = 1,
                        placement: str = "resident", compute_bytes: int = 2, cached_passes: int = 0,
                        sequence: int = 1) -> MemoryEstimate:
    """What sampling ``num_frames`` frames of ``height`` x ``width`` needs on the device (one of them, in a run over
    several processes).

    Args:
        transformer: the DiT (``WanTransformer3DModel``), weights as stored.
        batch_rows: guidance passes run as one batch (1 when they run one after another).
        placement: ``"resident"`` or ``"streamed"`` (see ``runtime/placement.py``), or ``"sharded"``: every
            weight split over the ``sequence`` ranks (FSDP2, ``runtime/parallel.py``); whole besides their shards:
            the embeddings and head for the whole pass, and three blocks (the one that runs, and the next one's
            all-gather output and its copy into the block's weights while it is prefetched).
        compute_bytes: bytes per element of the compute dtype (2 for bf16/fp16).
        cached_passes: guidance passes whose residuals the step cache keeps (``sampling/step_cache.py``; 0 = off):
            two float32 model-width tensors per pass, and two more per batch row while a forward stores them.
        sequence: ranks that split the video tokens (ring x ulysses): each holds its share of the activations.
    """
    blocks = [parameter_bytes(b) for b in transformer.blocks]
    rest = parameter_bytes(transformer) - sum(blocks)
    weights = {"resident": rest + sum(blocks),
               "streamed": rest + 2 * max(blocks),
               "sharded": rest + -(-(rest + sum(blocks)) // sequence) + 3 * max(blocks)}[placement]
    config = transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    per_token = 2 * config.ffn_dim * compute_bytes + 3 * dim * 4
    cache_per_token = 2 * dim * 4 * (cached_passes + batch_rows) if cached_passes else 0
    tokens = -(-video_tokens(num_frames, height, width) // sequence)
    return MemoryEstimate(weights, per_token * tokens * batch_rows + cache_per_token * tokens)


def check_gpu_memory(estimate: MemoryEstimate, device: torch.device, what: str, present: int = 0) -> None:
    """Refuse a run that cannot fit in the free memory of a CUDA ``device`` (other devices are not checked).

    Args:
        what: the run, as the message should name it (e.g. "81 frames at 512x512").
        present: bytes of the estimate already on the device (weights a pool worker keeps there between runs),
            which its free memory does not include.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    free += present
    if estimate.total <= free:
        return
    name = torch.cuda.get_device_name(device)
    raise InsufficientMemoryError(
        f"This run needs about {estimate.total / GIB:.1f} GiB of GPU memory (DiT weights {estimate.weights / GIB:.1f} "
        f"GiB + {estimate.activations / GIB:.1f} GiB for {what}) but {name} has {free / GIB:.1f} GiB free. Options: "
        "fp8 weights (--fp8 / weight_dtype fp8_e4m3fn: about half the weights), a GGUF file, streaming the blocks "
        "(--offload-blocks / offload_blocks: about 5 GiB for the 14B model), a smaller image size, or fewer frames.")


def check_host_memory(need: int, what: str, remedy: str) -> None:
    """Refuse to load ``need`` bytes into RAM when the machine has less room than that (available RAM plus free
    swap), before any of it is read: past it the operating system ends the process without a word. ``what`` names
    the load, ``remedy`` what needs less (in the words of the command line or the node)."""
    import psutil

    available, swap = psutil.virtual_memory().available, psutil.swap_memory().free
    if need > available + swap:
        raise InsufficientMemoryError(
            f"{what} needs about {need / GIB:.1f} GiB of RAM, but this machine has {available / GIB:.1f} GiB "
            f"available and {swap / GIB:.1f} GiB of free swap: {remedy}")


def check_budget(budget_gib: float | None, name: str = "gpu_memory") -> float | None:
    """A GPU memory budget in GiB as given (None: no budget), or a SettingsError naming ``name`` (the option as the
    user typed it) when it is not positive."""
    if budget_gib is not None and not 0 < budget_gib < math.inf:  # NaN fails this too
        raise SettingsError(f"{name} must be a positive number of GiB, got {budget_gib:g}.")
    return budget_gib


def choose_placement(transformer: torch.nn.Module, num_frames: int, height: int, width: int, budget_gib: float,
                     batch_rows: int = 1, compute_bytes: int = 2, cached_passes: int = 0, sequence: int = 1,
                     sharded: bool = False) -> tuple[str, MemoryEstimate]:
    """``"resident"`` when the whole run fits in ``budget_gib`` GiB, else ``"streamed"`` (blocks one at a time)
    when that fits, with the estimate of the placement chosen; else InsufficientMemoryError naming the options.
    With ``sharded`` weights (FSDP2 over ``sequence`` ranks) ``"sharded"`` is the one placement, checked the same
    way."""
    for placement in ("sharded",) if sharded else ("resident", "streamed"):
        estimate = estimate_dit_memory(transformer, num_frames, height, width, batch_rows, placement, compute_bytes,
                                       cached_passes, sequence)
        if estimate.total <= budget_gib * GIB:
            return placement, estimate
    how = "With its weights sharded" if sharded else "Even streaming the DiT's blocks"
    raise InsufficientMemoryError(
        f"{how} this run needs about {estimate.total / GIB:.2f} GiB of GPU memory, more "
        f"than the {budget_gib:g} GiB budget: a larger budget (if the GPU has the room), a smaller image size or "
        "fewer frames (or segments) fit.")
