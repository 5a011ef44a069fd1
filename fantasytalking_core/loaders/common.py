"""Strict, streaming weight assignment shared by the encoder loaders (umT5, CLIP, VAE).

A loader describes where each model tensor comes from (:class:`Source`, usually through a rename table of
:class:`Rename` rows applied by :func:`plan_from_table`); :func:`assign_weights` checks every shape on meta
tensors before reading any weight, then streams the tensors in one at a time. :func:`describe_checkpoint` names
what a wrongly chosen file is, for every loader's error messages.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFileError, ModelNotFoundError
from .state_dict import FP8_DTYPES, Checkpoint

CONFIG_DIR = Path(__file__).parent.parent / "configs"


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from.

    ``key``: the checkpoint key (as stored in the file), or None for a tensor the file does not carry by
    design (then ``transform(None)`` builds it). ``transform``: applied to the tensor read from the file
    (slicing a fused qkv, reshaping); it must also work on meta tensors, which is how shapes are checked
    before any weight is read.
    """

    key: str | None
    transform: Callable[[torch.Tensor | None], torch.Tensor] | None = None


def assign_weights(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    plan: Mapping[str, Source],
    *,
    ignored: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype,
    device: torch.device | str,
    kind: str,
    fix: str,
) -> None:
    """Fill a model built on the meta device from ``ckpt``, one checkpoint tensor at a time.

    ``plan`` maps every name of ``model.state_dict()`` to its :class:`Source`. Strict: before reading
    anything, a file tensor the plan needs but the file lacks, a file tensor nothing uses (unless
    ``ignored(key)``), or a shape that does not fit raises :class:`ModelFileError` naming the file, the first
    offending keys, and ``fix``. Floating tensors are cast to ``dtype`` and moved to ``device`` as they are
    read, so the weights are never held twice.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    if set(plan) != set(expected):  # a bug in the caller's plan, not in the file
        raise RuntimeError(f"load plan does not cover the model: {sorted(set(expected) ^ set(plan))[:5]}")

    def absent(src: Source) -> bool:
        return src.key not in ckpt.shapes if src.key is not None else src.transform is None

    missing = [(target, src.key) for target, src in plan.items() if absent(src)]
    used = {src.key for src in plan.values() if src.key is not None}
    unexpected = [k for k in ckpt.shapes if k not in used and not ignored(k)]
    wrong_shape: dict[str, tuple[tuple, tuple]] = {}  # file key (or target) -> (its shape, the model's)
    for target, src in plan.items():
        if absent(src):
            continue
        probe = None if src.key is None else torch.empty(ckpt.shapes[src.key], device="meta")
        shape = tuple((src.transform(probe) if src.transform else probe).shape)
        if shape != expected[target]:
            wrong_shape.setdefault(src.key or target, (ckpt.shapes.get(src.key, shape), expected[target]))
    if missing or unexpected or wrong_shape:
        raise key_mismatch_error(ckpt.path, kind, fix, missing, unexpected, wrong_shape, list(ckpt.shapes))

    by_key: dict[str | None, list[tuple[str, Callable | None]]] = defaultdict(list)
    for target, src in plan.items():
        by_key[src.key].append((target, src.transform))
    for key in ckpt.shapes:  # file order: sequential reads
        if key not in by_key:
            continue
        raw = ckpt.tensor(key, dtype if ckpt.dtypes[key].is_floating_point else None)
        # Targets that take the tensor unchanged (tied weights such as umT5's shared/embed_tokens) get one and
        # the same Parameter, so that a later model.to(...) moves it once instead of splitting it in two.
        whole = None
        for target, transform in by_key[key]:
            if transform is None:
                whole = whole if whole is not None else torch.nn.Parameter(raw.to(device), requires_grad=False)
                assign_tensor(model, target, whole)
            else:
                assign_tensor(model, target, transform(raw).to(device))
        del raw, whole
    for target, transform in by_key.get(None, []):
        value = transform(None)
        assign_tensor(model, target, value.to(device, dtype if value.is_floating_point() else None))
    model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Rename:
    """One row of a key table: model tensor ``target`` <- file tensor ``source`` (then ``transform``).

    Templates may hold ``{i}`` (a layer index) and ``{p}`` (``weight`` or ``bias``).
    """

    target: str
    source: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


def plan_from_table(targets: list[str], table: tuple[Rename, ...], source_prefix: str = "",
                    target_prefix: str = "") -> dict[str, Source]:
    """Apply a key table to every model tensor name: ``{target: Source(file key, transform)}``.

    ``target_prefix`` is stripped from model names before matching (transformers versions differ in
    whether ``vision_model.`` is part of the name); ``source_prefix`` is put before every file key.
    A name no row matches gets ``Source(None)``, which :func:`assign_weights` reports as missing.
    """
    compiled = [(_template_regex(row.target), row) for row in table]
    plan = {}
    for name in targets:
        canonical = name[len(target_prefix):] if name.startswith(target_prefix) else name
        plan[name] = Source(None)
        for pattern, row in compiled:
            match = pattern.fullmatch(canonical)
            if match:
                plan[name] = Source(source_prefix + row.source.format(**match.groupdict()), row.transform)
                break
    return plan


def assign_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter/buffer ``name`` without copying it (works on meta models).

    A Parameter subclass (e.g. diffusers' GGUFParameter) is kept as it is.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value.data if isinstance(value, torch.nn.Parameter) else value


def check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str | Path,
               kind: str, fix: str, file_keys: list[str] | None = None) -> None:
    """Strict: every ``expected`` tensor in ``found`` with its shape, nothing extra; else :func:`key_mismatch_error`.

    ``found`` and ``expected`` map tensor names (in the same naming) to shapes; ``file_keys``, when given, lets
    the message say what the file looks like.
    """
    missing = [(k, k) for k in sorted(expected) if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    wrong = {k: (tuple(found[k]), tuple(expected[k])) for k in sorted(expected)
             if k in found and tuple(found[k]) != tuple(expected[k])}
    if missing or unexpected or wrong:
        raise key_mismatch_error(source, kind, fix, missing, unexpected, wrong, file_keys)


def key_mismatch_error(
    source: str | Path, kind: str, fix: str, missing: list[tuple[str, str | None]], unexpected: list[str],
    wrong_shape: Mapping[str, tuple[tuple, tuple]], file_keys: list[str] | None = None, limit: int = 5,
) -> ModelFileError:
    """The one strict key-mismatch message of every loader: the file, the first offending keys of each kind, what
    the file looks like (from ``file_keys``) and ``fix``.

    Args:
        missing: (model tensor, file key it should come from, or None when nothing maps to it).
        unexpected: file keys nothing uses.
        wrong_shape: file key (or model tensor) -> (shape in the file, shape the model needs).
    """
    lines = [f"{source} does not match the {kind} it is loaded into:"]
    if missing:
        shown = ", ".join(f"'{k}'" if k else f"(nothing maps to model tensor '{t}')" for t, k in missing[:limit])
        lines.append(f"  {len(missing)} tensor(s) missing from the file, e.g. {shown}")
    if unexpected:
        shown = ", ".join(f"'{k}'" for k in unexpected[:limit])
        lines.append(f"  {len(unexpected)} unexpected tensor(s) in the file, e.g. {shown}")
    if wrong_shape:
        shown = "; ".join(f"'{k}' is {list(f)} in the file, the model needs {list(m)}"
                          for k, (f, m) in list(wrong_shape.items())[:limit])
        lines.append(f"  {len(wrong_shape)} tensor(s) of the wrong size: {shown}")
    guess = describe_checkpoint(file_keys) if file_keys else None
    if guess:
        lines.append(f"  The file looks like {guess}.")
    lines.append(fix)
    return ModelFileError("\n".join(lines))


# Key markers (a key ending with the marker) that identify what a file is: (marker, kind, description).
# First match wins, so the more specific markers come first.
_KNOWN_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("proj_model.proj.weight", "adapter", "the FantasyTalking audio adapter (fantasytalking_model.ckpt)"),
    ("cross_attn.processor.k_proj.weight", "adapter", "the FantasyTalking audio adapter (fantasytalking_model.ckpt)"),
    ("blocks.0.cross_attn.k_img.weight", "dit", "a Wan2.1 image-to-video DiT (diffusion model)"),
    ("blocks.0.self_attn.q.weight", "dit", "a Wan DiT (diffusion model)"),
    ("blocks.0.attn1.to_q.weight", "dit", "a Wan DiT in diffusers layout (diffusion model)"),
    ("encoder.conv1.weight", "vae", "a Wan VAE (Wan2.1_VAE.pth / wan_2.1_vae.safetensors layout)"),
    ("decoder.conv_in.weight", "vae", "a VAE in diffusers layout"),
    ("visual.transformer.0.attn.to_qkv.weight", "clip",
     "Wan's CLIP image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)"),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "clip",
     "a CLIP vision model in transformers layout (e.g. clip_vision_h.safetensors)"),
    ("blocks.0.ffn.gate.0.weight", "text_encoder", "Wan's umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth)"),
    ("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight", "text_encoder",
     "a umT5 text encoder in transformers layout (e.g. umt5_xxl_fp16.safetensors)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "other_text_encoder",
     "a T5 v1.1 text encoder (one shared position bias, e.g. t5xxl_*.safetensors for Flux/SD3), not umT5"),
    ("feature_projection.projection.weight", "wav2vec2", "a wav2vec2 audio model"),
    ("double_blocks.0.img_attn.qkv.weight", "other_dit", "a Flux diffusion model"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "other_dit", "an SD3 diffusion model"),
    ("input_blocks.0.0.weight", "other_dit", "a Stable Diffusion UNet"),
)


def identify_checkpoint(keys: list[str]) -> tuple[str, str] | None:
    """(kind, description) of the model a list of checkpoint keys belongs to, or None when unknown.

    kind is one of: adapter, dit, vae, clip, text_encoder, other_text_encoder, wav2vec2, other_dit.
    """
    for marker, kind, description in _KNOWN_LAYOUTS:
        if any(k == marker or k.endswith("." + marker) for k in keys):
            return kind, description
    return None


def describe_checkpoint(keys: list[str]) -> str | None:
    """Best guess of what model a list of checkpoint keys belongs to (for error messages), or None."""
    found = identify_checkpoint(keys)
    return None if found is None else found[1]


def wrong_file_error(ckpt: Checkpoint, kind: str, fix: str) -> ModelFileError:
    """The error for a file whose keys show it is not a ``kind`` at all."""
    keys = list(ckpt.shapes)
    guess = describe_checkpoint(keys)
    found = f"{len(keys)} tensors such as " + ", ".join(f"'{k}'" for k in keys[:3]) if keys else "no tensors"
    what = f" It looks like {guess}." if guess else ""
    return ModelFileError(f"{ckpt.path} is not a {kind}: it holds {found}.{what} {fix}")


def resolve_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    """The compute dtype: ``dtype`` if given, else the file's dominant float dtype (fp8 files -> bfloat16)."""
    if dtype is not None:
        return dtype
    floats = Counter(dt for dt in ckpt.dtypes.values() if dt.is_floating_point)
    if ckpt.is_fp8_scaled or any(dt in FP8_DTYPES for dt in floats):
        return torch.bfloat16  # fp8 is a storage format; the math runs in bf16 as ComfyUI does
    if not floats:
        return torch.float32
    stored = floats.most_common(1)[0][0]
    return torch.float32 if stored == torch.float64 else stored


def read_config(config: str | Path | Mapping | None, bundled: str) -> dict:
    """A config argument as a dict: None -> the bundled ``configs/<bundled>``, a Mapping, or a JSON path."""
    if isinstance(config, Mapping):
        return dict(config)
    path = CONFIG_DIR / bundled if config is None else Path(config)
    if not path.is_file():
        raise ModelNotFoundError(f"Config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} must hold a JSON object of config values, found {type(data).__name__}.")
    return data


