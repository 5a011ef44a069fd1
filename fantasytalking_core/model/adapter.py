"""The FantasyTalking audio adapter: its weights as one small module, and the maths both model routes share.

Two parts, as in the official release:

1. :class:`AudioProjModel`: wav2vec2 tokens [B, L, 768] -> Linear(768 -> P, no bias) -> LayerNorm -> [B, L, P]
   (P = 2048 for the released 14B adapter).
2. In every DiT block, the cross-attention gets an extra key/value pair ``k_proj``/``v_proj`` (P -> dim, no bias),
   :class:`AudioBlockKV`. The cross-attention's own normed query attends, frame by frame, to that frame's window of
   projected audio tokens; the result times ``audio_scale`` is added to the text and image attention outputs before
   the output projection.

:class:`AudioAdapter` holds both parts, as loaded from the adapter file (``loaders/adapter.py``). Two routes use
it, through the same :meth:`AudioBlockKV.forward` and :func:`audio_cross_attention`:

- the pack's engine: :func:`attach_audio_adapter` gives each diffusers cross-attention a
  :class:`FantasyTalkingAttnProcessor` that owns its block's :class:`AudioBlockKV` (so block offloading moves the
  k/v with the block);
- ComfyUI's own Wan model: ``model/wan_native.py`` (the original Wan layout ComfyUI uses) calls the block's
  :class:`AudioBlockKV` from a patched cross-attention forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from .precision import layer_norm_fp32, linear_fp32

WAV2VEC2_DIM = 768  # wav2vec2-base hidden size, the adapter's input width
TEXT_LEN = 512  # umT5 context rows the DiT always sees (shorter prompts are zero-padded)


class AudioProjModel(nn.Module):
    """wav2vec2 tokens [B, L, audio_dim] -> adapter tokens [B, L, proj_dim] (Linear without bias, then LayerNorm).

    Always computed in float32, whatever dtype its weights are stored in: the official ``infer.py`` calls
    ``proj_model`` in float32 outside the DiT's bf16 autocast.
    """

    def __init__(self, audio_dim: int = WAV2VEC2_DIM, proj_dim: int = 2048):
        super().__init__()
        self.proj = nn.Linear(audio_dim, proj_dim, bias=False)
        self.norm = nn.LayerNorm(proj_dim)

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        """[B, L, audio_dim] any float dtype -> [B, L, proj_dim] float32."""
        return layer_norm_fp32(self.norm, linear_fp32(self.proj, audio_features))


@dataclass
class AudioConditioning:
    """What the audio branch needs for one DiT forward.

    Attributes:
        windows: [B or 1, F, W, P] projected audio tokens, one window per latent frame (zero padding at the end).
        k_lens: [F] or [B, F] valid tokens per window; padded slots are masked out (flash-attn varlen semantics,
            the official GPU path). ``None`` attends the padding too (the official code without flash-attn).
        scale: the audio strength: a float, a [B] tensor (one per batch row, e.g. 0 for the no-audio guidance
            passes), or a [B, S] tensor with one value per video token (spatially varying strength).
    """

    windows: torch.Tensor
    k_lens: torch.Tensor | None
    scale: float | torch.Tensor = 1.0

    def __post_init__(self) -> None:
        # decided once per forward, not in every block (a tensor check would synchronise the GPU each time)
        self._silent = not bool(self.scale.any()) if isinstance(self.scale, torch.Tensor) else self.scale == 0

    def is_silent(self) -> bool:
        """True when the branch contributes exactly nothing (scale 0 everywhere), so it can be skipped."""
        return self._silent


def audio_cross_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_lens: torch.Tensor | None
) -> torch.Tensor:
    """Per-frame attention of video tokens to their audio window.

    Args:
        query: [B, S, H, D] normed cross-attention queries; S = F * tokens per frame, frame-major.
        keys, values: [B, F, W, H, D] the audio windows through ``k_proj``/``v_proj``.
        k_lens: [F] or [B, F] valid slots per window (the rest is masked), or None to attend every slot.
    Returns:
        [B, S, H, D]; a window with no valid slot contributes zeros.
    """
    batch, seq, heads, head_dim = query.shape
    frames, width = keys.shape[1], keys.shape[2]
    if seq % frames:
        raise ValueError(f"{seq} video tokens do not split into {frames} latent frames.")
    q = query.reshape(batch * frames, seq // frames, heads, head_dim).transpose(1, 2)
    k = keys.reshape(batch * frames, width, heads, head_dim).transpose(1, 2)
    v = values.reshape(batch * frames, width, heads, head_dim).transpose(1, 2)
    mask = None
    if k_lens is not None:
        lens = k_lens.to(query.device).expand(batch, frames).reshape(-1, 1, 1, 1)  # [B*F, 1, 1, 1]
        mask = torch.arange(width, device=query.device).view(1, 1, 1, width) < lens
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B*F, H, S/F, D]
    if mask is not None:
        out = out.masked_fill(lens == 0, 0.0)  # an all-masked softmax is NaN; an empty window adds nothing
    return out.transpose(1, 2).reshape(batch, seq, heads, head_dim)


def _scale_for(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Broadcast a float, [B] or [B, S] audio scale against an attention output [B, S, H, D]."""
    if not isinstance(scale, torch.Tensor):
        return scale
    scale = scale.to(device=like.device, dtype=like.dtype)
    if scale.ndim == 1:
        return scale.view(-1, 1, 1, 1)
    if scale.ndim == 2:
        return scale.view(scale.shape[0], scale.shape[1], 1, 1)
    raise ValueError(f"audio scale must be a float, [B] or [B, S]; got shape {tuple(scale.shape)}.")


class AudioBlockKV(nn.Module):
    """One block's audio key/value projections, P -> dim, no bias (official ``blocks.{i}.cross_attn.processor``)."""

    def __init__(self, audio_proj_dim: int, dim: int):
        super().__init__()
        self.k_proj = nn.Linear(audio_proj_dim, dim, bias=False)
        self.v_proj = nn.Linear(audio_proj_dim, dim, bias=False)

    def forward(self, query: torch.Tensor, cond: AudioConditioning | None) -> torch.Tensor | None:
        """The scaled audio term to add to a cross-attention's output before its output projection.

        Args:
            query: [B, S, H, D] the cross-attention's normed query (the text attention's own).
            cond: the windows, valid lengths and scale for this forward; ``None`` or a zero scale: no audio.
        Returns:
            [B, S, H, D] in the query's dtype, or ``None`` when the branch contributes nothing.
        """
        if cond is None or cond.is_silent():
            return None
        heads = query.shape[2]
        windows = cond.windows.to(device=query.device, dtype=query.dtype)
        keys = F.linear(windows, _weight_like(self.k_proj, query)).unflatten(-1, (heads, -1))  # [B, F, W, H, D]
        values = F.linear(windows, _weight_like(self.v_proj, query)).unflatten(-1, (heads, -1))
        if keys.shape[0] != query.shape[0]:
            keys = keys.expand(query.shape[0], *keys.shape[1:])
            values = values.expand(query.shape[0], *values.shape[1:])
        audio = audio_cross_attention(query, keys, values, cond.k_lens)
        return audio * _scale_for(cond.scale, audio)


def _weight_like(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear``'s weight on ``x``'s device and dtype (a no-op when it is there already: the engine's case; ComfyUI
    may keep the adapter in its stored dtype beside an fp8 or GGUF DiT that computes in bf16)."""
    return linear.weight.to(device=x.device, dtype=x.dtype)


class AudioAdapter(nn.Module):
    """The FantasyTalking adapter's weights: ``proj`` (wav2vec2 -> P) and one :class:`AudioBlockKV` per DiT block."""

    def __init__(self, num_layers: int, dim: int, audio_proj_dim: int, audio_dim: int = WAV2VEC2_DIM):
        super().__init__()
        self.proj = AudioProjModel(audio_dim, audio_proj_dim)
        self.blocks = nn.ModuleList(AudioBlockKV(audio_proj_dim, dim) for _ in range(num_layers))

    @property
    def dim(self) -> int:
        """Width of the DiT it fits (the k/v output width)."""
        return self.blocks[0].k_proj.out_features


class FantasyTalkingAttnProcessor(nn.Module):
    """Cross-attention processor for diffusers' ``WanAttention``: text + image attention (as diffusers'
    ``WanAttnProcessor``) plus the FantasyTalking audio branch of its block (``audio``, an :class:`AudioBlockKV`).

    In the model's state dict the block's k/v sit at ``blocks.{i}.attn2.processor.audio.{k,v}_proj.weight``.
    ``conditioning`` is set for the duration of one forward by :meth:`FantasyTalkingModel.conditioned_on` and is
    ``None`` otherwise (the audio branch is then off).
    """

    def __init__(self, audio: AudioBlockKV, text_len: int = TEXT_LEN):
        super().__init__()
        self.audio = audio
        self.text_len = text_len
        self.conditioning: AudioConditioning | None = None

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: object | None = None,
    ) -> torch.Tensor:
        # 1. Split the context: CLIP image tokens first, then the text rows (Wan I2V layout).
        image_len = encoder_hidden_states.shape[1] - self.text_len
        context_img = encoder_hidden_states[:, :image_len]
        context = encoder_hidden_states[:, image_len:]

        # 2. Text attention with the block's own normed query.
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)

        # 3. Image attention (I2V models only).
        if image_len > 0:
            key_img = attn.norm_added_k(attn.add_k_proj(context_img)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(context_img).unflatten(2, (attn.heads, -1))
            out = out + dispatch_attention_fn(query, key_img, value_img)

        # 4. Audio attention, per latent frame, scaled.
        audio = self.audio(query, self.conditioning)
        if audio is not None:
            out = out + audio

        out = out.flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def attach_audio_adapter(transformer: nn.Module, adapter: AudioAdapter) -> None:
    """Give every block's cross-attention a :class:`FantasyTalkingAttnProcessor` owning that block's adapter k/v."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if len(adapter.blocks) != len(transformer.blocks) or adapter.dim != dim:
        raise ValueError(f"the adapter has {len(adapter.blocks)} blocks of width {adapter.dim}; this DiT has "
                         f"{len(transformer.blocks)} of width {dim}.")
    for block, kv in zip(transformer.blocks, adapter.blocks):
        block.attn2.set_processor(FantasyTalkingAttnProcessor(kv))


def audio_processors(transformer: nn.Module) -> list[FantasyTalkingAttnProcessor]:
    """The audio processors of a transformer that has the adapter attached (one per block)."""
    procs = [b.attn2.processor for b in transformer.blocks]
    if not all(isinstance(p, FantasyTalkingAttnProcessor) for p in procs):
        raise ValueError("This transformer has no FantasyTalking audio adapter attached (attach_audio_adapter).")
    return procs
