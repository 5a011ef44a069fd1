"""Which kernels the DiT's attention runs on: PyTorch's SDPA (default) or an installed fused library, through
diffusers' attention dispatcher (``attention_backend``), for the video self-attention and the text/image
cross-attention, and for the audio branch (which attends each run of equal windows over their valid slots, so it
needs no mask and runs on every backend). Hub-downloaded kernels are not offered: nothing is downloaded at run
time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import SettingsError

# user-facing name -> diffusers' backend name, and what it needs
ATTENTION_BACKENDS = {
    "sdpa": ("native", "nothing: PyTorch's scaled_dot_product_attention"),
    "flash": ("flash", "the flash-attn package (pip install flash-attn) on an NVIDIA GPU"),
    "sage": ("sage", "the sageattention package (pip install sageattention) on an NVIDIA GPU"),
    "xformers": ("xformers", "the xformers package"),
}


def check_attention(name: str, device: torch.device | str | None = None) -> str:
    """``name`` if it is offered and installed (and, given ``device``, runs there), else a SettingsError naming
    what it needs and the default.

    With ``device``, a library is tried on one small attention call there: an install built for another PyTorch,
    CUDA or GPU imports fine and fails only at its first kernel (seen: an xformers wheel of another PyTorch, "xFormers
    wasn't build with CUDA support"), which would be minutes into a run. Callers pass the run's own device once it
    is known (a torchrun rank's GPU, ComfyUI's), so no other GPU is touched.
    """
    if name not in ATTENTION_BACKENDS:
        raise SettingsError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}.")
    if name == "sdpa":  # always there; the default needs no diffusers import (settings are checked before it)
        return name
    from diffusers.models.attention_dispatch import attention_backend

    try:
        with attention_backend(ATTENTION_BACKENDS[name][0]):
            pass
    except (RuntimeError, ValueError, ImportError):
        raise SettingsError(f"attention {name!r} needs {ATTENTION_BACKENDS[name][1]}, which is not available "
                            "here; install it, or use sdpa (the default).") from None
    if device is not None and (name, torch.device(device)) not in _RUNS_ON:
        failure = _first_call_fails(ATTENTION_BACKENDS[name][0], torch.device(device))
        if failure:
            raise SettingsError(f"attention {name!r} is installed but cannot run on {device} ({failure}): install "
                                f"a build for this PyTorch ({torch.__version__}) and GPU, or use sdpa (the "
                                "default).")
        _RUNS_ON.add((name, torch.device(device)))
    return name


# (library, device) pairs that ran in this process (failures are not kept: an out-of-memory moment passes)
_RUNS_ON: set[tuple[str, torch.device]] = set()


def _first_call_fails(backend: str, device: torch.device) -> str:
    """Why one small bf16 attention call on ``backend`` fails on ``device`` (the error's first and last lines),
    or ''."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q = torch.ones(1, 16, 2, 64, device=device, dtype=torch.bfloat16)  # [B, S, H, D], a head size every kernel has
    try:
        dispatch_attention_fn(q, q, q, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a kernel that fails on the GPU reports it here
    except Exception as exc:  # noqa: BLE001 - any failure of the library is the answer
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # the first line says what failed; a long message (xformers') ends with why
        return lines[0][:160] + (f" ... {lines[-1][:160]}" if len(lines) > 1 else "")
    return ""


@contextmanager
def using_attention(name: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the DiT forwards inside the block on attention backend ``name`` (see :data:`ATTENTION_BACKENDS`), tried
    first on ``device`` (where the DiT computes) when given."""
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend(ATTENTION_BACKENDS[check_attention(name, device)][0]):
        yield
