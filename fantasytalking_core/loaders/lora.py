"""Wan LoRAs for the DiT: read in the formats users have, applied for one run through diffusers' LoRA support.

Formats (all converted by diffusers' ``WanLoraLoaderMixin.lora_state_dict``, so a format diffusers learns works
here too): ComfyUI / kijai files (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` or ``lora_A``, with
``alpha`` and ``diff_b`` bias updates; lightx2v's step-distillation LoRAs are this format), musubi-tuner files
(``lora_unet_blocks_N_...``) and diffusers' own (``transformer.blocks.N.attn1.to_q.lora_A.weight``). That
conversion drops whole-weight differences (``.diff``, and ``.diff_b`` of norms): all zeros in the files seen, and
then nothing is lost; a file whose dropped differences are not zero is refused, never half applied.

Strict: every LoRA matrix must land on a Linear of this DiT with matching sizes, else the file is refused with the
keys that match nothing (a LoRA for another model, say Wan 2.2 or the 1.3B, must not be a silent no-op).

:func:`applied_loras` injects the adapters (peft) with their strengths for the duration of a ``with`` and removes
them afterwards, so the loaded DiT is unchanged between runs. They compute on top of any weight storage: bf16,
fp8 (the LoRA matrices are kept in the compute dtype, not rounded to fp8) and GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from ..errors import MissingDependencyError, ModelFileError
from .state_dict import open_checkpoint

PREFIX = "transformer."  # diffusers' key prefix for the DiT
_MATRIX_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


@dataclass(frozen=True)
class WanLora:
    """One LoRA, in diffusers' key layout, with the strength to apply it at.

    Attributes:
        name: adapter name (the file's stem, made unique by the caller).
        state_dict: ``{"transformer.<module>.lora_A.weight": [r, in], ".lora_B.weight": [out, r], ...}``.
        strength: multiplier of the low-rank update (1 = as trained; 0 = no effect).
    """

    name: str
    state_dict: dict[str, torch.Tensor]
    strength: float = 1.0


def read_wan_lora(path: str | Path, strength: float = 1.0, name: str | None = None) -> WanLora:
    """Read a Wan LoRA file (.safetensors, .pt/.pth/.ckpt) into diffusers' layout (not yet checked against a DiT)."""
    path = Path(path)
    try:
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    except ImportError as exc:  # diffusers imports its LoRA code lazily; peft is checked when applying
        raise MissingDependencyError(f"LoRAs need diffusers' LoRA support ({exc}).") from None
    raw = dict(open_checkpoint(path).items())
    try:
        state_dict = WanLoraLoaderMixin.lora_state_dict(raw)
    except (ValueError, KeyError, IndexError) as exc:
        raise ModelFileError(f"{path.name} is not a Wan LoRA this pack can read ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); use a Wan 2.1 LoRA in ComfyUI, kijai, musubi or diffusers "
                             "format.") from None
    if not state_dict or not all(k.endswith(_MATRIX_SUFFIXES) for k in state_dict):
        odd = [k for k in state_dict if not k.endswith(_MATRIX_SUFFIXES)][:3]
        raise ModelFileError(f"{path.name} holds no LoRA matrices this pack can apply"
                             + (f" (e.g. {', '.join(odd)})" if odd else "") + ".")
    dropped = dropped_differences(raw, state_dict)
    if dropped:
        raise ModelFileError(f"{path.name} changes {len(dropped)} weights as a whole (e.g. {', '.join(dropped[:3])}), "
                             "which this pack's LoRA support cannot apply (only LoRA matrices and bias updates); "
                             "in ComfyUI, load it with the core LoraLoaderModelOnly on the native Wan route "
                             "(FantasyTalking Apply Audio), which applies them.")
    state_dict = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in state_dict.items()}
    return WanLora(name or path.stem, state_dict, strength)


def dropped_differences(raw: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> list[str]:
    """The whole-weight and bias differences (``.diff``, ``.diff_b``) of ``raw`` that are not zero and did not
    reach ``converted`` (diffusers' conversion moves the ones it applies, the same tensors, and drops the rest)."""
    kept = {id(tensor) for tensor in converted.values()}
    return [key for key, tensor in raw.items()
            if key.endswith((".diff", ".diff_b")) and id(tensor) not in kept and bool(tensor.any())]


def check_lora_fits(lora: WanLora, transformer: nn.Module) -> None:
    """Every matrix of ``lora`` targets a Linear of ``transformer`` with matching sizes, else ModelFileError naming
    up to three keys that match nothing."""
    modules = dict(transformer.named_modules())
    unmatched = []
    for key, tensor in lora.state_dict.items():
        suffix = next(s for s in _MATRIX_SUFFIXES if key.endswith(s))
        module = modules.get(key[len(PREFIX):-len(suffix)])
        module = getattr(module, "base_layer", module)  # already wrapped by another adapter
        if not isinstance(module, nn.Linear):
            unmatched.append(key)
        elif suffix == ".lora_A.weight" and tensor.shape[1] != module.in_features:
            unmatched.append(f"{key} (input {tensor.shape[1]}, the layer takes {module.in_features})")
        elif suffix != ".lora_A.weight" and tensor.shape[0] != module.out_features:
            unmatched.append(f"{key} (output {tensor.shape[0]}, the layer gives {module.out_features})")
    if unmatched:
        raise ModelFileError(f"LoRA {lora.name!r}: {len(unmatched)} of {len(lora.state_dict)} matrices match no "
                             f"layer of this DiT (e.g. {'; '.join(unmatched[:3])}): it was made for another model "
                             "(Wan 2.2, the 1.3B, T2V without image layers?).")


def _load_in_compute_dtype(transformer: nn.Module, lora: WanLora, dtype: torch.dtype) -> None:
    """Set ``lora``'s matrices, as read, in ``dtype``: peft creates them in the base weight's dtype, which for fp8
    storage rounds the update to 3 mantissa bits (and fp8 matrices cannot multiply on most devices)."""
    params = dict(transformer.named_parameters())
    for name, param in params.items():  # all of the adapter's, also the zero biases of layers without diff_b
        if f".{lora.name}." in name and ".lora_" in name:
            param.data = param.data.to(dtype)
    for key, tensor in lora.state_dict.items():
        module, _, kind = key[len(PREFIX):].rpartition(".lora_")  # "blocks.0.attn1.to_q", "A.weight"
        matrix, _, field = kind.partition(".")
        param = params[f"{module}.lora_{matrix}.{lora.name}.{field}"]
        param.data = tensor.to(device=param.device, dtype=dtype)


@contextmanager
def applied_loras(transformer: nn.Module, loras: Sequence[WanLora], dtype: torch.dtype) -> Iterator[nn.Module]:
    """Inside the ``with``, ``transformer`` computes with ``loras`` at their strengths; afterwards (also on error)
    the adapters are removed and every layer is the original module again.

    Args:
        transformer: the DiT (diffusers ``WanTransformer3DModel``; weights in any storage).
        loras: LoRAs to apply together (names unique); empty: a no-op.
        dtype: the compute dtype the LoRA matrices are kept in.
    """
    if not loras:
        yield transformer
        return
    try:
        import peft  # noqa: F401  (diffusers' LoRA injection)
    except ImportError:
        raise MissingDependencyError("LoRAs need the peft package: pip install peft.") from None
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise ValueError(f"LoRA names must be unique, got {names}.")
    for lora in loras:
        check_lora_fits(lora, transformer)
    try:
        verbosity = diffusers_logging.get_verbosity()
        # fit was checked above; diffusers would warn about the zero biases of layers without diff_b
        diffusers_logging.set_verbosity_error()
        try:
            for lora in loras:
                # a copy: diffusers pops entries from the dict it is given
                transformer.load_lora_adapter(dict(lora.state_dict), prefix=PREFIX.rstrip("."),
                                              adapter_name=lora.name)
                _load_in_compute_dtype(transformer, lora, dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        transformer.set_adapters(names, [lora.strength for lora in loras])
        yield transformer
    finally:
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
