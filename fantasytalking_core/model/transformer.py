"""The FantasyTalking DiT: diffusers' ``WanTransformer3DModel`` plus the audio adapter, with one forward.

Configs are data: the Wan2.1-I2V-14B configs ship in ``configs/`` and other sizes come as a dict or JSON file,
in diffusers' terms or in Wan's own constructor terms (``dim``, ``num_heads``, ...), see :func:`resolve_config`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from torch import nn

from .adapter import TEXT_LEN, AudioConditioning, AudioProjModel, TokenLayoutError, audio_processors
from .block_cache import BlockCacheCall, skipping_blocks
from ..errors import ModelFileError
from .limits import ROPE_MAX_SEQ_LEN
from .precision import OFFICIAL, attention_backends, check_policy, use_float32_islands

CONFIG_DIR = Path(__file__).parent.parent / "configs"
BUNDLED_DIT_CONFIGS = {
    "wan2.1_i2v_14b_480p": CONFIG_DIR / "wan2.1_i2v_14b_480p.json",
    "wan2.1_i2v_14b_720p": CONFIG_DIR / "wan2.1_i2v_14b_720p.json",
}
DEFAULT_DIT_CONFIG = "wan2.1_i2v_14b_480p"
IMAGE_TOKENS = 257  # CLIP ViT-H/14 penultimate tokens: CLS + 16x16 patches
CLIP_DIM = 1280


def wan_config_to_diffusers(wan: dict) -> dict:
    """Wan's ``WanModel`` constructor arguments -> ``WanTransformer3DModel`` config."""
    if wan.get("model_type", "i2v") != "i2v":
        raise ModelFileError(f"config is for Wan model_type '{wan.get('model_type')}'; FantasyTalking needs 'i2v'.")
    if list(wan.get("window_size", [-1, -1])) != [-1, -1]:
        raise ModelFileError("config has a local attention window; Wan2.1 I2V uses global attention ([-1, -1]).")
    if wan["dim"] % wan["num_heads"]:
        raise ModelFileError(f"config dim {wan['dim']} is not divisible by num_heads {wan['num_heads']}.")
    return {
        "patch_size": list(wan.get("patch_size", [1, 2, 2])),
        "num_attention_heads": wan["num_heads"],
        "attention_head_dim": wan["dim"] // wan["num_heads"],
        "in_channels": wan["in_dim"],
        "out_channels": wan["out_dim"],
        "text_dim": wan["text_dim"],
        "freq_dim": wan["freq_dim"],
        "ffn_dim": wan["ffn_dim"],
        "num_layers": wan["num_layers"],
        "cross_attn_norm": bool(wan.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if wan.get("qk_norm", True) else None,
        "eps": wan.get("eps", 1e-6),
        "image_dim": CLIP_DIM,
        "added_kv_proj_dim": wan["dim"],
        "rope_max_seq_len": ROPE_MAX_SEQ_LEN,
        "pos_embed_seq_len": None,
    }


def resolve_config(config: str | Path | dict | None) -> dict:
    """A ``WanTransformer3DModel`` config from a bundled name, a JSON path or a dict (diffusers or Wan terms)."""
    if config is None:
        config = DEFAULT_DIT_CONFIG
    if isinstance(config, str) and config in BUNDLED_DIT_CONFIGS:
        config = BUNDLED_DIT_CONFIGS[config]
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"Cannot read DiT config {path}: {exc}") from None
    config = dict(config)
    if "dim" in config and "num_heads" in config:
        return wan_config_to_diffusers(config)
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def build_transformer(config: dict, empty: bool = False) -> WanTransformer3DModel:
    """Construct the DiT. ``empty=True`` puts parameters on the meta device (buffers stay real) for streaming."""
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return WanTransformer3DModel(**config)
    return WanTransformer3DModel(**config)


def compute_dtype(transformer: WanTransformer3DModel) -> torch.dtype:
    """The dtype activations run in. Read from the patch embedding (a Conv3d): Linear weights may be stored
    quantized (GGUF) or in fp8 and say nothing about the compute dtype."""
    return transformer.patch_embedding.weight.dtype


def pad_text(context: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """Zero-pad text-encoder output [B, L, C] (L <= text_len) to [B, text_len, C], as the official DiT does."""
    if context.shape[1] > text_len:
        raise ValueError(f"text context has {context.shape[1]} rows; at most {text_len} are allowed.")
    return torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))


def context_parallel_config(transformer: nn.Module):
    """diffusers' ``ContextParallelConfig`` that ``enable_parallelism`` gave ``transformer``, or None."""
    return getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)


def check_token_split(transformer: nn.Module, tokens: int) -> None:
    """Under diffusers' context parallelism with equal shards (not its ``*_anything`` modes), refuse a sequence of
    ``tokens`` video tokens that does not split evenly over the ring x ulysses ranks, before any rank splits it
    (diffusers would stop with a bare assertion)."""
    cp = context_parallel_config(transformer)
    if cp is None or cp.ulysses_anything or cp.ring_anything:
        return
    ranks = cp.ring_degree * cp.ulysses_degree
    if tokens % ranks:
        raise TokenLayoutError(f"{tokens} video tokens do not split evenly over the {ranks} ring x ulysses ranks; "
                               "choose a frame count or image size whose token count they divide, or other degrees.")


def sequence_group(transformer: nn.Module) -> dist.ProcessGroup | None:
    """The process group of the ranks that split each pass's video tokens (diffusers' context parallelism: the
    ring x ulysses mesh, flattened as its sharders split the sequence); None without it."""
    cp = context_parallel_config(transformer)
    return None if cp is None else cp._flattened_mesh.get_group()


class FantasyTalkingModel(nn.Module):
    """Wan2.1 I2V DiT with the FantasyTalking audio adapter.

    Attributes:
        transformer: ``WanTransformer3DModel`` whose cross-attentions carry ``FantasyTalkingAttnProcessor``.
        audio_proj: :class:`AudioProjModel` (wav2vec2 768 -> adapter width), computed in float32.
        precision: how a bf16/fp16 compute dtype rounds: ``"official"`` (default) keeps the official float32
            islands (:mod:`fantasytalking_core.model.precision`); ``"diffusers"`` runs diffusers' own forward, whose
            residual stream, modulation and head are in the compute dtype. float32 compute always runs
            diffusers' forward (both policies are the same graph there).
    """

    def __init__(self, transformer: WanTransformer3DModel, audio_proj: AudioProjModel, precision: str = OFFICIAL):
        super().__init__()
        self.transformer = transformer
        self.audio_proj = audio_proj
        self.precision = check_policy(precision)
        audio_processors(transformer)  # refuse a transformer without the adapter now, not at the first forward
        use_float32_islands(transformer)  # either policy: the policy is passed per call
        # set while the weights wait elsewhere and stream to a device (runtime.placement.streamed_blocks)
        self.execution_device: torch.device | None = None
        # LoRAs (loaders.lora.WanLora) applied while the model samples (runtime.placement.dit_on_device)
        self.loras: tuple = ()
        # the files it was loaded from (loaders.model_source.ModelSource), for worker processes to load it too
        self.source = None

    def with_loras(self, loras: Sequence) -> FantasyTalkingModel:
        """A model sharing this one's weights that samples with ``loras`` added to this one's (``WanLora``s; names
        must be unique). This model is unchanged: in ComfyUI the loader's cached model stays LoRA-free."""
        model = FantasyTalkingModel(self.transformer, self.audio_proj, self.precision)
        model.loras = (*self.loras, *loras)
        model.source = self.source
        names = [lora.name for lora in model.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"the same LoRA name twice: {names}; give each LoRA once.")
        return model

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.transformer)

    @property
    def device(self) -> torch.device:
        """Where the model computes (and its inputs go): the streaming device, else where its weights are."""
        return self.execution_device or self.transformer.patch_embedding.weight.device

    def project_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """wav2vec2 last hidden state [B, L, 768] -> adapter tokens [B, L, P], float32 whatever the compute dtype
        (the official ``proj_model`` runs in float32 outside autocast); each block's k/v Linear rounds them."""
        return self.audio_proj(audio_features.to(self.audio_proj.proj.weight.device))

    @contextmanager
    def conditioned_on(self, audio: AudioConditioning | None) -> Iterator[None]:
        """Make every block's audio branch use ``audio`` for the forwards inside the ``with`` (and never after).

        The processors are looked up on every call, not cached: a processor swapped in later (as diffusers'
        attention-backend and parallelism helpers do) gets the audio too, and one that is not a FantasyTalking
        processor raises instead of silently turning the audio off.
        """
        processors = audio_processors(self.transformer)
        for proc in processors:
            proc.conditioning = audio
        try:
            yield
        finally:
            for proc in processors:
                proc.conditioning = None

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image_tokens: torch.Tensor,
        image_latents: torch.Tensor,
        audio: AudioConditioning | None = None,
        cache: BlockCacheCall | None = None,
    ) -> torch.Tensor:
        """Flow-matching velocity.

        Args:
            latents: [B, 16, T, H/8, W/8] noisy latent z_t.
            timestep: [B] or scalar, t = 1000 * sigma (sigma in [0, 1]).
            text: [B, L, text_dim] umT5 output, L <= 512 (zero-padded here).
            image_tokens: [B, 257, 1280] CLIP ViT-H penultimate tokens of the reference image.
            image_latents: [B, 20, T, H/8, W/8] I2V conditioning y (4 mask channels + first-frame VAE latent).
            audio: windows, valid lengths and scale; ``None`` runs the plain Wan I2V forward. Its
                ``tokens_per_frame`` is set here from the latent's patch grid.
            cache: first-block cache of this forward, one pass per batch row (``model/block_cache.py``); ``None``
                runs every block.
        Returns:
            [B, 16, T, H/8, W/8] predicted velocity: float32 under the official policy, else the compute dtype.
        """
        batch = latents.shape[0]
        dtype = self.dtype
        timestep = torch.as_tensor(timestep, device=latents.device).float().reshape(-1).expand(batch)
        hidden = torch.cat([latents, image_latents.to(latents.dtype)], dim=1).to(dtype)
        p_t, p_h, p_w = self.transformer.config.patch_size
        per_frame = (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
        check_token_split(self.transformer, latents.shape[2] // p_t * per_frame)
        if audio is not None:
            audio = replace(audio, tokens_per_frame=per_frame)
        if cache is not None:
            cache.sequence_group = sequence_group(self.transformer)  # every rank of a split pass decides alike
        with self.conditioned_on(audio), skipping_blocks(self.transformer.blocks, cache), \
                attention_backends(self.device, dtype):
            # called as a module in either policy, so hooks on the transformer (offloading) always apply
            return self.transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=pad_text(text),
                                    encoder_hidden_states_image=image_tokens, return_dict=False,
                                    precision=self.precision)[0]
