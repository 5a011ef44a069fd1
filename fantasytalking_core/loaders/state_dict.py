"""Reading model files tensor by tensor, whatever their format.

Every loader in this package goes through :func:`open_checkpoint`: it lists keys and shapes without reading
any weight, and yields tensors one at a time, so a 28 GB checkpoint never sits in memory twice. Formats:

- ``.safetensors`` (one file), or a shard set given by its ``*.safetensors.index.json`` or by any one shard
  named like ``...-00001-of-00007.safetensors``;
- ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` torch pickles, read with ``weights_only=True`` and ``mmap=True``;
- ``.gguf`` is not read here: GGUF goes through diffusers' GGUF support (see ``loaders/gguf.py``).

ComfyUI "fp8 scaled" files store ``W_fp8`` plus a per-tensor ``<name>.scale_weight``; the real weight is
``W_fp8.float() * scale_weight``. Loading such a file as plain fp8 silently gives wrong weights, so
:class:`Checkpoint` dequantizes them and hides the scale tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelFileError, ModelNotFoundError

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Markers of ComfyUI's fp8-scaled files: an empty "scaled_fp8" tensor and per-weight scale tensors.
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")


@dataclass
class Checkpoint:
    """A model file opened lazily.

    ``shapes`` maps every weight key (scale tensors of fp8-scaled files excluded) to its shape, and ``dtypes``
    to its stored dtype; ``metadata`` is the safetensors header metadata (of the first file; empty for pickles);
    :meth:`tensor` reads one tensor, dequantizing fp8-scaled weights.
    """

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    _locations: dict[str, Path] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    _pickle: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    _scales: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    @property
    def is_fp8_scaled(self) -> bool:
        return bool(self._scales)

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (on CPU); fp8-scaled weights come back dequantized to ``dtype`` (default float32)."""
        raw = self._read(key)
        scale = self.scale(key)
        if scale is not None:  # dequantize straight into the target dtype: one allocation per tensor
            return raw.to(dtype or torch.float32).mul_(scale.to(dtype or torch.float32))
        return raw if dtype is None or raw.dtype == dtype else raw.to(dtype)

    def scale(self, key: str) -> torch.Tensor | None:
        """The float32 scale of an fp8-scaled weight (None for every other tensor)."""
        scale_key = self._scales.get(key)
        return None if scale_key is None else self._read(scale_key).to(torch.float32)

    def raw(self, key: str) -> torch.Tensor:
        """The tensor exactly as stored (fp8-scaled weights NOT dequantized: pair them with :meth:`scale`)."""
        return self._read(key)

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time, in file order."""
        for key in self.shapes:
            yield key, self.tensor(key, dtype)

    def _read(self, key: str) -> torch.Tensor:
        if self._pickle is not None:
            return self._pickle[key]
        with safe_open(str(self._locations[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model file or shard set lazily (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"Model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder; open_checkpoint takes one file (or a shard index json).")
    name = path.name.lower()
    if name.endswith(".gguf"):
        raise ModelFileError(f"{path} is a GGUF file; load it with the GGUF loader, not open_checkpoint.")
    if name.endswith(".safetensors.index.json") or _SHARD_RE.match(path.name):
        return _open_safetensors(_shard_map(path), path)
    if name.endswith(".safetensors"):
        return _open_safetensors(None, path)
    if name.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path)
    raise ModelFileError(
        f"Unsupported model file type: {path.name}. Expected .safetensors, a shard index .json, "
        f".pth/.pt/.ckpt/.bin, or .gguf."
    )


def _shard_map(path: Path) -> dict[str, Path]:
    """Key -> shard file of a sharded safetensors set, from its index json (given, or found beside a shard)."""
    if path.name.endswith(".json"):
        index = path
    else:
        stem = _SHARD_RE.match(path.name)["stem"]
        candidates = sorted(path.parent.glob(f"{stem}*.safetensors.index.json"))
        if not candidates:
            raise ModelFileError(
                f"{path.name} is one shard of a set but no '{stem}.safetensors.index.json' lies beside it. "
                "Keep the index json from the original download in the same folder."
            )
        index = candidates[0]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = {str(k): index.parent / v for k, v in weight_map.items()}
    except (ValueError, LookupError, TypeError, AttributeError) as exc:  # not JSON, not text, not the layout
        raise ModelFileError(f"{index} is not a safetensors shard index (a JSON object whose 'weight_map' maps "
                             f"each key to its shard file): {type(exc).__name__}: {exc}") from None
    missing = sorted({str(p) for p in files.values() if not p.exists()})
    if missing:
        raise ModelNotFoundError(f"Shard set {index.name} is incomplete; missing: {', '.join(missing)}")
    return files


def _open_safetensors(shard_map: dict[str, Path] | None, path: Path) -> Checkpoint:
    files = sorted(set(shard_map.values())) if shard_map else [path]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    locations: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = metadata or dict(f.metadata() or {})
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key] = tuple(sl.get_shape())
                    dtypes[key] = _safetensors_dtype(sl.get_dtype())
                    locations[key] = file
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelFileError(f"{file} is not a readable safetensors file: {exc}") from None
    return _with_fp8_scales(Checkpoint(path, shapes, dtypes, locations, metadata))


def load_pickle(path: Path, mmap: bool = True) -> object:
    """What a torch pickle holds, read with ``weights_only`` (no code runs); ``mmap``: memory-mapped where the format
    allows (tensors are read when used), else read into memory."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
            if not mmap:
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-checkpoint files
        raise ModelFileError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}). "
                             "Re-download the file or choose another one.") from None


def _open_pickle(path: Path) -> Checkpoint:
    flat = flatten_state_dict(load_pickle(path))
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    dtypes = {k: v.dtype for k, v in flat.items()}
    return _with_fp8_scales(Checkpoint(path, shapes, dtypes, {}, _pickle=flat))


def flatten_state_dict(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> one flat dict with dotted keys (``{'a': {'b': t}}`` -> ``{'a.b': t}``)."""
    if isinstance(state, torch.Tensor):
        return {prefix[:-1]: state}
    if not isinstance(state, Mapping):
        raise ModelFileError(f"Expected a state dict of tensors, found {type(state).__name__} at '{prefix[:-1]}'.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out.update(flatten_state_dict(value, f"{prefix}{key}."))
    return out


def _with_fp8_scales(ckpt: Checkpoint) -> Checkpoint:
    """Detect ComfyUI fp8-scaled layout; map each scaled weight to its scale and hide the scale tensors."""
    scale_keys = [k for k in ckpt.shapes if k.endswith(_SCALE_SUFFIXES) or k.endswith("scaled_fp8")]
    if not scale_keys:
        return ckpt
    for key in scale_keys:
        if key.endswith(".scale_weight"):
            weight = key[: -len(".scale_weight")] + ".weight"
            if weight not in ckpt.shapes:
                raise ModelFileError(f"{ckpt.path}: scale tensor '{key}' has no weight '{weight}'.")
            ckpt._scales[weight] = key
        ckpt.shapes.pop(key)
        ckpt.dtypes.pop(key)
    return ckpt


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    return table.get(name, torch.float32)


def strip_prefix(keys: list[str], prefixes: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Find the one prefix in ``prefixes`` that every key carries ("" if none) and map stripped -> original."""
    for prefix in prefixes:
        if prefix and keys and all(k.startswith(prefix) for k in keys):
            return prefix, {k[len(prefix):]: k for k in keys}
    return "", {k: k for k in keys}
