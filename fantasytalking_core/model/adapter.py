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

Under sequence (context) parallelism each rank holds a contiguous slice of the video tokens, which need not start
or end on a frame boundary. :class:`TokenShard` says where the slice sits; the branch then attends the frames the
slice touches, padding partial frames, and computes for the slice's tokens exactly what the whole sequence would.
Whenever the tokens per frame are known, a token count that is not frames x tokens per frame without a shard is
an error (:class:`TokenLayoutError`), never a silent regrouping of tokens into the wrong frames.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..errors import FantasyTalkingError
from .precision import layer_norm_fp32, linear_fp32

WAV2VEC2_DIM = 768  # wav2vec2-base hidden size, the adapter's input width
TEXT_LEN = 512  # umT5 context rows the DiT always sees (shorter prompts are zero-padded)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""An attention function: q [B, S, H, D], k and v [B, L, H, D] -> [B, S, H, D], unmasked (the engine's: diffusers'
dispatcher on the block's backend; ComfyUI's route: ComfyUI's own attention, so its attention options apply)."""


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
        k_lens: [F] or [B, F] valid tokens per window; padded slots are left out (flash-attn varlen semantics,
            the official GPU path). ``None`` attends the padding too (the official code without flash-attn).
        scale: the audio strength: a float, a [B] tensor (one per batch row, e.g. 0 for the no-audio guidance
            passes), or a [B, S] tensor with one value per video token of the whole sequence (spatially varying
            strength; a shard takes its own columns).
        tokens_per_frame: video tokens per latent frame (patch rows x patch columns), set by the model's forward
            from the latent shape. Known, it lets the branch refuse a token count that is not F x tokens per frame
            and find the frames of a sharded sequence; ``None`` (callers that pass the whole sequence) only
            checks that the tokens split evenly into F frames.
    """

    windows: torch.Tensor
    k_lens: torch.Tensor | None
    scale: float | torch.Tensor = 1.0
    tokens_per_frame: int | None = None

    def __post_init__(self) -> None:
        # decided once per forward, not in every block (a tensor check would synchronise the GPU each time)
        self._silent = not bool(self.scale.any()) if isinstance(self.scale, torch.Tensor) else self.scale == 0
        self.valid_lengths = valid_lengths(self.k_lens)  # Python ints: the runs of equal windows, once per forward

    def is_silent(self) -> bool:
        """True when the branch contributes exactly nothing (scale 0 everywhere), so it can be skipped."""
        return self._silent


class TokenLayoutError(FantasyTalkingError, ValueError):
    """Video tokens that do not match the latent frames they are said to cover."""


@dataclass(frozen=True)
class TokenShard:
    """Where one rank's contiguous slice of the video tokens sits in the whole sequence (sequence parallelism).

    Attributes:
        offset: global index of the slice's first token (0 <= offset < total).
        total: S, tokens of the whole sequence = F * tokens_per_frame.
        tokens_per_frame: video tokens per latent frame (frame-major order: frame, patch row, patch column).
    """

    offset: int
    total: int
    tokens_per_frame: int

    def frame_range(self, length: int) -> tuple[int, int]:
        """[first, end) latent frames the ``length`` tokens from ``offset`` touch (partial frames included)."""
        return self.offset // self.tokens_per_frame, -(-(self.offset + length) // self.tokens_per_frame)


def token_shard(rank: int, world_size: int, local_tokens: int, total_tokens: int, tokens_per_frame: int) -> TokenShard:
    """The shard of rank ``rank`` when ``total_tokens`` are split into ``world_size`` contiguous slices the way
    diffusers' context-parallel sharders do (``tensor_split``: the first ``total % world_size`` slices one token
    longer; equal slices when it divides, as ``chunk``). ``local_tokens`` is checked against that slice's length."""
    base, extra = divmod(total_tokens, world_size)
    offset = rank * base + min(rank, extra)
    expected = base + (rank < extra)
    if local_tokens != expected:
        raise TokenLayoutError(f"rank {rank} of {world_size} holds {local_tokens} video tokens; splitting "
                               f"{total_tokens} tokens gives it {expected}: the sequence is not sharded the way "
                               "the context-parallel plan splits it.")
    return TokenShard(offset, total_tokens, tokens_per_frame)


def window_runs(valid: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Consecutive latent frames whose windows hold the same number of valid slots.

    Args:
        valid: per latent frame, its window's valid (leading) slots.
    Returns:
        (first frame, end frame, valid slots) per run, in frame order; e.g. (1, 20, 20, ...) gives
        ((0, 1, 1), (1, 3, 20)). A clip has a few: its first window is cut at the start of the recording, its last
        ones at the end.
    """
    runs: list[tuple[int, int, int]] = []
    for frame, length in enumerate(valid):
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], frame + 1, length)
        else:
            runs.append((frame, frame + 1, int(length)))
    return tuple(runs)


def valid_lengths(k_lens: torch.Tensor | Sequence | None) -> tuple[int, ...] | tuple[tuple[int, ...], ...] | None:
    """``k_lens`` ([F] or [B, F], a tensor or nested lists) as tuples of Python ints, read once per forward (a GPU
    tensor is copied once, not in every block); None stays None."""
    if k_lens is None:
        return None
    rows = k_lens.tolist() if isinstance(k_lens, torch.Tensor) else k_lens
    return tuple(tuple(map(int, row)) if isinstance(row, Sequence) else int(row) for row in rows)


def audio_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_lens: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None,
    tokens_per_frame: int | None = None,
    shard: TokenShard | None = None,
    attend: Attend | None = None,
) -> torch.Tensor:
    """Per-frame attention of video tokens to their audio window.

    The padding at the end of a window is left out rather than masked: the frames are attended in runs of equal
    valid length (:func:`window_runs`), each run over its windows' valid slots only, which is what the official
    flash-attn varlen call computes. No mask means any attention kernel runs it (flash kernels take none).

    Args:
        query: [B, S, H, D] normed cross-attention queries, frame-major; S = F * tokens per frame, or, with
            ``shard``, the shard's s tokens starting at global token ``shard.offset``.
        keys, values: [B, F, W, H, D] the audio windows through ``k_proj``/``v_proj`` (all F frames).
        k_lens: [F] or [B, F] valid (leading) slots per window, as a tensor or Python ints (see
            :func:`valid_lengths`); None attends every slot (the official code without flash-attn).
        tokens_per_frame: tokens per latent frame; given (and no shard), S must be exactly F times it.
        shard: where a sharded query sits; its frames are attended with the partial first and last frames padded
            with zero queries, which are dropped again (attention rows are independent).
        attend: the attention function (:data:`Attend`); None: diffusers' ``dispatch_attention_fn`` on its active
            backend (SDPA unless ``attention_backend`` chose another).
    Returns:
        [B, S, H, D] (or [B, s, H, D] for a shard); a window with no valid slot contributes zeros.
    """
    batch, seq, heads, head_dim = query.shape
    frames, width = keys.shape[1], keys.shape[2]
    k_lens = valid_lengths(k_lens)
    if shard is not None:
        if shard.total != frames * shard.tokens_per_frame or not 0 <= shard.offset <= shard.total - seq:
            raise TokenLayoutError(f"a shard of {seq} tokens at offset {shard.offset} does not fit {frames} latent "
                                   f"frames x {shard.tokens_per_frame} tokens = {shard.total}.")
        first, end = shard.frame_range(seq)
        lead = shard.offset - first * shard.tokens_per_frame
        trail = end * shard.tokens_per_frame - shard.offset - seq
        padded = F.pad(query, (0, 0, 0, 0, lead, trail))  # [B, (end - first) * tokens_per_frame, H, D]
        lens = None if k_lens is None else _frames_of(k_lens, first, end)
        out = audio_cross_attention(padded, keys[:, first:end], values[:, first:end], lens, shard.tokens_per_frame,
                                    attend=attend)
        return out[:, lead:lead + seq]
    if tokens_per_frame is not None and seq != frames * tokens_per_frame:
        raise TokenLayoutError(
            f"{seq} video tokens are not {frames} latent frames x {tokens_per_frame} tokens per frame: a slice of "
            "the sequence (context parallelism) needs its TokenShard, or its tokens would be grouped into the "
            "wrong frames; give the attention processor the parallel config (enable_parallelism).")
    if seq % frames:
        raise TokenLayoutError(f"{seq} video tokens do not split into {frames} latent frames.")
    if k_lens is not None and k_lens and isinstance(k_lens[0], Sequence):  # [B, F]
        if len(set(k_lens)) > 1:  # rows with different windows: each row on its own
            if len(k_lens) != batch:
                raise ValueError(f"k_lens has {len(k_lens)} rows of window lengths for a batch of {batch}.")
            return torch.cat([audio_cross_attention(query[b:b + 1], keys[b:b + 1], values[b:b + 1], row,
                                                    attend=attend) for b, row in enumerate(k_lens)])
        k_lens = k_lens[0]
    per_frame = seq // frames
    attend = attend or dispatch_attention_fn
    outs = []
    for first, end, length in window_runs([width] * frames if k_lens is None else [min(n, width) for n in k_lens]):
        n = end - first
        if length == 0:  # an empty window adds nothing (softmax over no key is undefined)
            outs.append(query.new_zeros(batch, n * per_frame, heads, head_dim))
            continue
        q = query[:, first * per_frame:end * per_frame].reshape(batch * n, per_frame, heads, head_dim)
        k = keys[:, first:end, :length].reshape(batch * n, length, heads, head_dim)
        v = values[:, first:end, :length].reshape(batch * n, length, heads, head_dim)
        outs.append(attend(q, k, v).reshape(batch, n * per_frame, heads, head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _frames_of(k_lens: Sequence[int] | Sequence[Sequence[int]], first: int, end: int
               ) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """Frames [first, end) of [F] or [B, F] valid lengths."""
    if k_lens and isinstance(k_lens[0], Sequence):
        return tuple(tuple(row[first:end]) for row in k_lens)
    return tuple(k_lens[first:end])


def _scale_for(scale: float | torch.Tensor, like: torch.Tensor, shard: TokenShard | None = None
               ) -> float | torch.Tensor:
    """Broadcast a float, [B] or [B, S] audio scale against an attention output [B, S, H, D] (or a shard's
    [B, s, H, D]: a per-token scale of the whole sequence is sliced to the shard's tokens)."""
    if not isinstance(scale, torch.Tensor):
        return scale
    scale = scale.to(device=like.device, dtype=like.dtype)
    if scale.ndim == 2 and shard is not None:
        scale = scale[:, shard.offset:shard.offset + like.shape[1]]  # [B, s]
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

    def forward(self, query: torch.Tensor, cond: AudioConditioning | None, shard: TokenShard | None = None,
                attend: Attend | None = None) -> torch.Tensor | None:
        """The scaled audio term to add to a cross-attention's output before its output projection.

        Args:
            query: [B, S, H, D] the cross-attention's normed query (the text attention's own); with ``shard``,
                [B, s, H, D] for the shard's tokens only.
            cond: the windows, valid lengths and scale for this forward; ``None`` or a zero scale: no audio.
            shard: where a sharded query sits in the whole sequence (sequence parallelism), else None.
            attend: the attention function of its block (:data:`Attend`; None: diffusers' active backend).
        Returns:
            [B, S, H, D] (or [B, s, H, D]) in the query's dtype, or ``None`` when the branch contributes nothing.
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
        audio = audio_cross_attention(query, keys, values, cond.valid_lengths, cond.tokens_per_frame, shard, attend)
        return audio * _scale_for(cond.scale, audio, shard)


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

    ``_attention_backend`` and ``_parallel_config`` are the attributes diffusers' ``set_attention_backend`` and
    ``enable_parallelism`` look for and set on a processor. The text and image attention run locally on the shard's
    queries (the 769 context tokens are whole on every rank, as in diffusers' ``WanAttnProcessor``); the audio
    branch finds the shard's place in the sequence from the context-parallel mesh (:meth:`token_shard`).
    """

    _attention_backend: str | None = None
    _parallel_config: object | None = None  # diffusers' ParallelConfig, set by enable_parallelism

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
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)

        # 3. Image attention (I2V models only).
        if image_len > 0:
            key_img = attn.norm_added_k(attn.add_k_proj(context_img)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(context_img).unflatten(2, (attn.heads, -1))
            out = out + dispatch_attention_fn(query, key_img, value_img, backend=self._attention_backend)

        # 4. Audio attention, per latent frame, scaled (on a shard: the frames its tokens touch).
        audio = self.audio(query, self.conditioning, self.token_shard(query.shape[1]),
                           functools.partial(dispatch_attention_fn, backend=self._attention_backend))
        if audio is not None:
            out = out + audio

        out = out.flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def token_shard(self, local_tokens: int) -> TokenShard | None:
        """Where this rank's ``local_tokens`` video tokens sit, under diffusers' context parallelism (the
        ``ring`` x ``ulysses`` mesh flattened, as its sharders split the sequence); None without it or without
        audio. Needs the conditioning's ``tokens_per_frame`` (set by the model's forward)."""
        cond = self.conditioning
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None or cond is None or cond.is_silent():
            return None
        if cond.tokens_per_frame is None:
            raise TokenLayoutError("the audio branch under context parallelism needs the conditioning's "
                                   "tokens_per_frame (FantasyTalkingModel.forward sets it).")
        mesh = cp._flattened_mesh
        total = cond.windows.shape[1] * cond.tokens_per_frame
        return token_shard(dist.get_rank(mesh.get_group()), mesh.size(), local_tokens, total, cond.tokens_per_frame)


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
