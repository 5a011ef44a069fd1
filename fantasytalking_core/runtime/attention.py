"""Which kernels the DiT's attention runs on: PyTorch's SDPA (default) or an installed fused library, through
diffusers' attention dispatcher (``attention_backend``), for the video self-attention and the text/image
cross-attention, and for the audio branch (which attends each run of equal windows over their valid slots, so it
needs no mask and runs on every backend). Hub-downloaded kernels are not offered: nothing is downloaded at run
time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import SettingsError

# user-facing name -> diffusers' backend name, and what it needs
ATTENTION_BACKENDS = {
    "sdpa": ("native", "nothing: PyTorch's scaled_dot_product_attention"),
    "flash": ("flash", "the flash-attn package (pip install flash-attn) on an NVIDIA GPU"),
    "sage": ("sage", "the sageattention package (pip install sageattention) on an NVIDIA GPU"),
    "xformers": ("xformers", "the xformers package"),
}


def check_attention(name: str) -> str:
    """``name`` if it is offered and usable here, else a SettingsError naming what it needs and the default."""
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
    return name


@contextmanager
def using_attention(name: str) -> Iterator[None]:
    """Run the DiT forwards inside the block on attention backend ``name`` (see :data:`ATTENTION_BACKENDS`)."""
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend(ATTENTION_BACKENDS[check_attention(name)][0]):
        yield
