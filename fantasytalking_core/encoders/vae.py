"""Wan2.1 video VAE: load, encode, decode, and the image-to-video conditioning ``y``.

The network is diffusers' :class:`~diffusers.AutoencoderKLWan`. Files accepted by :func:`load_vae`:

- the original layout (``Wan2.1_VAE.pth``, ComfyUI's ``wan_2.1_vae.safetensors``): keys ``encoder.*``,
  ``decoder.*``, ``conv1.*``, ``conv2.*``, converted by diffusers' ``convert_wan_vae_to_diffusers``;
- the same with a ``model.`` / ``vae.`` / ``first_stage_model.`` / ``model_state.`` prefix (DiffSynth, bundles);
- the diffusers layout (``vae/diffusion_pytorch_model.safetensors`` of the ``-Diffusers`` repos).

Latents are *normalized* the way Wan's pipeline uses them: ``(mu - latents_mean) / latents_std`` per channel,
taking the posterior mean (no sampling). Pixel videos are ``[B, 3, F, H, W]`` in ``[-1, 1]``; latents are
``[B, 16, T, H/8, W/8]`` with ``T = (F - 1) // 4 + 1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..errors import ImageInputError, ModelFileError
from ..loaders.common import Source, assign_weights, read_config, resolve_dtype, wrong_file_error
from ..loaders.state_dict import open_checkpoint, strip_prefix

VAE_CONFIG = "wan2.1_vae.json"

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


MASK_CHANNELS = 4  # the known-frame mask channels that lead an I2V conditioning y


def first_frame_mask(num_frames: int, height: int, width: int) -> torch.Tensor:
    """The 4-channel "known frame" mask of Wan I2V: [4, T, height/8, width/8] float32.

    Built like Wan's pipeline: a per-pixel-frame mask (1 for the given first frame, 0 after) whose first
    frame is repeated four times so that every latent frame covers exactly four mask frames; those four
    become the channels. Latent frame 0 is therefore all ones, every later latent frame all zeros.
    """
    return known_frames_mask(num_frames, 1, height, width)


def known_frames_mask(num_frames: int, num_known: int, height: int, width: int) -> torch.Tensor:
    """:func:`first_frame_mask` with the first ``num_known`` pixel frames given: [4, T, height/8, width/8].

    ``num_known`` = 4m+1 makes latent frames 0..m all ones and the rest all zeros (a segment's motion frames).
    """
    t = latent_num_frames(num_frames)
    if not 1 <= num_known <= num_frames:
        raise ValueError(f"num_known must be in [1, {num_frames}], got {num_known}.")
    h, w = height // 8, width // 8
    per_frame = torch.zeros(num_frames, h, w)
    per_frame[:num_known] = 1.0
    padded = torch.cat([per_frame[:1].expand(4, h, w), per_frame[1:]])  # [4T, h, w]
    return padded.view(t, 4, h, w).transpose(0, 1).contiguous()


def known_latents(y: torch.Tensor, num_known: int) -> torch.Tensor:
    """The normalized latents of the first ``num_known`` (4m+1) pixel frames inside an I2V conditioning ``y``
    [1, 4 + z_dim, T, h, w] (from :func:`known_frames_condition`): [1, z_dim, m + 1, h, w].

    The VAE is causal in time (latent frame j sees pixel frames up to 4j), so these are the known frames' own
    latents: the zero frames after them do not reach them.
    """
    return y[:, MASK_CHANNELS:, :latent_num_frames(num_known)]


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
    return known_frames_condition(vae, image[:, None], num_frames, tile_size, tile_stride)


@torch.no_grad()
def known_frames_condition(
    vae: AutoencoderKLWan,
    frames: torch.Tensor,
    num_frames: int,
    tile_size: tuple[int, int] | None = None,
    tile_stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`image_to_video_condition` with several known first frames: [1, 4 + z_dim, T, H/8, W/8] float32.

    frames: [3, K, H, W] in [-1, 1], the first K pixel frames of the video (K = 1: the I2V image; K = 4m+1 so
    that the mask covers whole latent frames). Channels 0..3: :func:`known_frames_mask`; channels 4..: the
    normalized latent of [frames, num_frames - K black (zero) frames].
    """
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ImageInputError(f"Expected known frames [3, K, H, W] in [-1, 1], got shape {list(frames.shape)}.")
    _, known, height, width = frames.shape
    latent_num_frames(num_frames)
    video = torch.zeros(1, 3, num_frames, height, width, dtype=vae.dtype, device=vae.device)
    video[0, :, :known] = frames.to(vae.device, vae.dtype)
    latent = encode_video(vae, video, tile_size, tile_stride)
    mask = known_frames_mask(num_frames, known, height, width).to(latent.device)
    return torch.cat([mask[None], latent], dim=1)
