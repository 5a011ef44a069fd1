"""Wan2.1 video VAE: load, encode, decode, and the image-to-video conditioning ``y``.

The network is diffusers' :class:`~diffusers.AutoencoderKLWan`. Files accepted by :func:`load_vae`:

- the original layout (``Wan2.1_VAE.pth``, ComfyUI's ``wan_2.1_vae.safetensors``): keys ``encoder.*``,
  ``decoder.*``, ``conv1.*``, ``conv2.*``, converted by diffusers' ``convert_wan_vae_to_diffusers``;
- the same with a ``model.`` / ``vae.`` / ``first_stage_model.`` / ``model_state.`` prefix (DiffSynth, bundles);
- the diffusers layout (``vae/diffusion_pytorch_model.safetensors`` of the ``-Diffusers`` repos).

Latents are *normalized* the way Wan's pipeline uses them: ``(mu - latents_mean) / latents_std`` per channel,
taking the posterior mean (no sampling). Pixel videos are ``[B, 3, F, H, W]`` in ``[-1, 1]``; latents are
``[B, 16, T, H/8, W/8]`` with ``T = (F - 1) // 4 + 1``.

This module also holds the strict streaming loader that :mod:`.text_encoder` and :mod:`.image_encoder` share
(:func:`assign_weights` and friends); it belongs in ``loaders/`` once that package takes shared helpers.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from .errors import ImageInputError, ModelFileError, ModelNotFoundError
from .loaders.state_dict import FP8_DTYPES, Checkpoint, open_checkpoint, strip_prefix

CONFIG_DIR = Path(__file__).parent / "configs"
VAE_CONFIG = "wan2.1_vae.json"

# =====================================================================================================
# Strict streaming loader shared by the three encoders
# =====================================================================================================


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
        raise ModelFileError(_mismatch_message(ckpt, kind, fix, missing, unexpected, wrong_shape))

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
                _set_tensor(model, target, whole)
            else:
                _set_tensor(model, target, transform(raw).to(device))
        del raw, whole
    for target, transform in by_key.get(None, []):
        value = transform(None)
        _set_tensor(model, target, value.to(device, dtype if value.is_floating_point() else None))
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


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value.data if isinstance(value, torch.nn.Parameter) else value


def _mismatch_message(ckpt, kind, fix, missing, unexpected, wrong_shape, limit: int = 5) -> str:
    lines = [f"{ckpt.path} does not match the {kind} it is loaded into:"]
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
    guess = describe_checkpoint(list(ckpt.shapes))
    if guess:
        lines.append(f"  The file looks like {guess}.")
    lines.append(fix)
    return "\n".join(lines)


# Key markers (a key ending with the marker) that identify what a wrongly chosen file is; first match wins.
_KNOWN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("proj_model.proj.weight", "the FantasyTalking audio adapter (fantasytalking_model.ckpt)"),
    ("cross_attn.processor.k_proj.weight", "the FantasyTalking audio adapter (fantasytalking_model.ckpt)"),
    ("blocks.0.cross_attn.k_img.weight", "a Wan2.1 image-to-video DiT (diffusion model)"),
    ("blocks.0.self_attn.q.weight", "a Wan DiT (diffusion model)"),
    ("blocks.0.attn1.to_q.weight", "a Wan DiT in diffusers layout (diffusion model)"),
    ("encoder.conv1.weight", "a Wan VAE (Wan2.1_VAE.pth / wan_2.1_vae.safetensors layout)"),
    ("decoder.conv_in.weight", "a VAE in diffusers layout"),
    ("visual.transformer.0.attn.to_qkv.weight",
     "Wan's CLIP image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)"),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight",
     "a CLIP vision model in transformers layout (e.g. clip_vision_h.safetensors)"),
    ("blocks.0.ffn.gate.0.weight", "Wan's umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth)"),
    ("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
     "a umT5 text encoder in transformers layout (e.g. umt5_xxl_fp16.safetensors)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight",
     "a T5 v1.1 text encoder (one shared position bias, e.g. t5xxl_*.safetensors for Flux/SD3), not umT5"),
    ("feature_projection.projection.weight", "a wav2vec2 audio model"),
)


def describe_checkpoint(keys: list[str]) -> str | None:
    """Best guess of what model a list of checkpoint keys belongs to (for error messages), or None."""
    for marker, description in _KNOWN_LAYOUTS:
        if any(k == marker or k.endswith("." + marker) for k in keys):
            return description
    return None


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


# =====================================================================================================
# Wan2.1 VAE
# =====================================================================================================

_VAE_PREFIXES = ("model_state.", "model.", "vae.", "first_stage_model.")
# Wan's own config names -> AutoencoderKLWan argument names (the rest are spelled the same).
_VAE_WAN_NAMES = {"dim": "base_dim"}
_VAE_INFO_KEYS = {"construct", "_class_name", "_diffusers_version", "_name", "_name_or_path"}
_VAE_FIX = ("Choose the Wan2.1 VAE (Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors; Wan2.2's 48-channel "
            "VAE is a different model), or pass the config that matches the file.")


def vae_config(config: str | Path | Mapping | None = None) -> dict:
    """AutoencoderKLWan arguments: the bundled Wan2.1 config, overridden by ``config``.

    ``config`` may use diffusers' names or Wan's own (``dim`` for ``base_dim``, as in the test fixture's
    config.json); ``latents_mean``/``latents_std`` default to the Wan2.1 tables.
    """
    merged = {k: v for k, v in read_config(None, VAE_CONFIG).items() if k not in _VAE_INFO_KEYS}
    if config is None:
        return merged
    user = {_VAE_WAN_NAMES.get(k, k): v for k, v in read_config(config, VAE_CONFIG).items()
            if k not in _VAE_INFO_KEYS}
    allowed = set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}
    unknown = sorted(set(user) - allowed)
    if unknown:
        raise ModelFileError(f"Unknown Wan VAE config key(s) {unknown}; known: {sorted(allowed)}.")
    merged.update(user)
    for table in ("latents_mean", "latents_std"):
        if len(merged[table]) != merged["z_dim"]:
            raise ModelFileError(f"VAE config: {table} has {len(merged[table])} values but z_dim is "
                                 f"{merged['z_dim']}; give one value per latent channel.")
    return merged


def load_vae(
    path: str | Path,
    config: str | Path | Mapping | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> AutoencoderKLWan:
    """Load a Wan2.1 VAE file (original, prefixed or diffusers layout) into ``AutoencoderKLWan``.

    ``config``: None for the real Wan2.1 VAE, else a dict or JSON path (see :func:`vae_config`).
    ``dtype``: None keeps the file's dtype (fp8 -> bfloat16). Loading is strict (see :func:`assign_weights`).
    """
    ckpt = open_checkpoint(path)
    cfg = vae_config(config)
    prefix, names = strip_prefix(ckpt.keys, _VAE_PREFIXES)  # stripped key -> key in the file
    if "encoder.conv1.weight" in names and "decoder.conv1.weight" in names:
        # The converter only renames; feeding it the keys as values gives diffusers name -> original key.
        key_map = convert_wan_vae_to_diffusers({k: k for k in names})
    elif "encoder.conv_in.weight" in names and "decoder.conv_in.weight" in names:
        key_map = {k: k for k in names}
    else:
        raise wrong_file_error(ckpt, "Wan2.1 VAE", _VAE_FIX)

    with init_empty_weights():
        vae = AutoencoderKLWan(**cfg)
    plan = {t: Source(names[key_map[t]] if t in key_map else None) for t in vae.state_dict()}
    assign_weights(vae, ckpt, plan, dtype=resolve_dtype(ckpt, dtype), device=device,
                   kind="Wan2.1 VAE (AutoencoderKLWan)", fix=_VAE_FIX)
    return vae


def latent_num_frames(num_frames: int) -> int:
    """Latent frames T for F pixel frames (F = 4k + 1: the first frame alone, then groups of four)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81), got {num_frames}.")
    return (num_frames - 1) // 4 + 1


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


@contextmanager
def _tiling(vae: AutoencoderKLWan, tile_size: tuple[int, int] | None,
            tile_stride: tuple[int, int] | None) -> Iterator[None]:
    """Enable diffusers' spatial tiling for one call and restore the VAE's previous settings after it."""
    names = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width",
             "tile_sample_stride_height", "tile_sample_stride_width")
    saved = {n: getattr(vae, n) for n in names}
    try:
        if tile_size is None:
            vae.use_tiling = False
        else:
            stride = tile_stride or (tile_size[0] * 3 // 4, tile_size[1] * 3 // 4)
            sizes = (*tile_size, *stride)
            if any(s <= 0 or s % 8 for s in sizes) or stride[0] > tile_size[0] or stride[1] > tile_size[1]:
                raise ValueError(f"tile_size {tile_size} / tile_stride {stride} must be positive multiples of 8 "
                                 "pixels with stride <= size.")
            vae.use_tiling = True
            (vae.tile_sample_min_height, vae.tile_sample_min_width,
             vae.tile_sample_stride_height, vae.tile_sample_stride_width) = sizes
        yield
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ImageInputError(f"Expected a video [B, 3, F, H, W], got shape {list(video.shape)}.")
    if video.shape[-1] % 8 or video.shape[-2] % 8:
        raise ImageInputError(f"Video height and width must be multiples of 8, got {list(video.shape[-2:])}.")
    latent_num_frames(video.shape[2])


@torch.no_grad()
def encode_video(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    tile_size: tuple[int, int] | None = None,
    tile_stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Pixels -> normalized latents.

    video: [B, 3, F, H, W] in [-1, 1], F = 4k + 1, H and W multiples of 8.
    Returns float32 [B, z_dim, (F-1)//4+1, H/8, W/8] = (posterior mean - latents_mean) / latents_std.
    ``tile_size``/``tile_stride`` (pixels, multiples of 8) switch on diffusers' spatial tiling.
    """
    _check_video(video)
    x = video.to(vae.device, vae.dtype)
    with _tiling(vae, tile_size, tile_stride):
        mu = vae.encode(x).latent_dist.mean.float()  # the mean, never a sample: conditioning is deterministic
    mean, std = _latent_stats(vae, mu)
    return (mu - mean) / std


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKLWan,
    latents: torch.Tensor,
    tile_size: tuple[int, int] | None = None,
    tile_stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Normalized latents -> pixels.

    latents: [B, z_dim, T, h, w] as returned by :func:`encode_video` or the sampler.
    Returns float32 [B, 3, 4(T-1)+1, 8h, 8w] clamped to [-1, 1]. With ``tile_size`` (pixels, e.g. (256, 256))
    the frames are decoded in overlapping spatial tiles (diffusers' tiling, blended seams), which bounds
    memory for large videos; tiles differ slightly from an untiled decode near their seams.
    """
    if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
        raise ValueError(f"Expected latents [B, {vae.config.z_dim}, T, h, w], got {list(latents.shape)}.")
    mean, std = _latent_stats(vae, latents)
    z = (latents.float() * std + mean).to(vae.device, vae.dtype)
    with _tiling(vae, tile_size, tile_stride):
        video = vae.decode(z).sample
    return video.float().clamp(-1.0, 1.0)


def first_frame_mask(num_frames: int, height: int, width: int) -> torch.Tensor:
    """The 4-channel "known frame" mask of Wan I2V: [4, T, height/8, width/8] float32.

    Built like Wan's pipeline: a per-pixel-frame mask (1 for the given first frame, 0 after) whose first
    frame is repeated four times so that every latent frame covers exactly four mask frames; those four
    become the channels. Latent frame 0 is therefore all ones, every later latent frame all zeros.
    """
    t = latent_num_frames(num_frames)
    h, w = height // 8, width // 8
    per_frame = torch.zeros(num_frames, h, w)
    per_frame[0] = 1.0
    padded = torch.cat([per_frame[:1].expand(4, h, w), per_frame[1:]])  # [4T, h, w]
    return padded.view(t, 4, h, w).transpose(0, 1).contiguous()


@torch.no_grad()
def image_to_video_condition(
    vae: AutoencoderKLWan,
    image: torch.Tensor,
    num_frames: int,
    tile_size: tuple[int, int] | None = None,
    tile_stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The I2V conditioning ``y`` of Wan2.1: [1, 4 + z_dim, T, H/8, W/8] float32.

    image: [3, H, W] (or [1, 3, H, W]) in [-1, 1], already at the video size (H, W multiples of 8).
    Channels 0..3: :func:`first_frame_mask`; channels 4..: the normalized latent of the video
    [image, num_frames - 1 black (zero) frames].
    """
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ImageInputError(f"Expected an image [3, H, W] in [-1, 1], got shape {list(image.shape)}.")
    _, height, width = image.shape
    latent_num_frames(num_frames)
    video = torch.zeros(1, 3, num_frames, height, width, dtype=vae.dtype, device=vae.device)
    video[0, :, 0] = image.to(vae.device, vae.dtype)
    latent = encode_video(vae, video, tile_size, tile_stride)
    mask = first_frame_mask(num_frames, height, width).to(latent.device)
    return torch.cat([mask[None], latent], dim=1)
