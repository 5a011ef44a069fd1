"""The audio branch on a DiT in the original Wan layout, as ComfyUI's own Wan model has it (the native route).

ComfyUI (``comfy/ldm/wan/model.py``, 0.33) keeps Wan's module names: a block's I2V cross-attention has
``q``, ``k``, ``v``, ``o``, ``norm_q``, ``norm_k`` (text) and ``k_img``, ``v_img``, ``norm_k_img`` (CLIP image
tokens), ``num_heads``, and the block calls ``cross_attn(norm3(x), context, context_img_len=...,
transformer_options=...)``. :class:`AudioCrossAttention` is a replacement for that forward: the same text and
image attention with the module's own layers, plus :class:`~.adapter.AudioBlockKV` of the block before ``o``,
exactly as the official FantasyTalking processor. It never imports ComfyUI: the attention function comes in as an
argument (ComfyUI's ``optimized_attention``, for the text, image and audio attention alike, so ComfyUI's attention
options reach all three; the image and audio keys, a few hundred and 1-17 tokens, take its variant without
low-precision kernels, as ComfyUI's Wan does for the image), and which batch rows get audio is read from the per-call
``transformer_options`` ComfyUI passes (``cond_or_uncond``, ``grid_sizes``, ``context_window``).

Shapes: B batch rows (all guidance chunks together), S video tokens (frame-major), F latent frames, W window
slots, P adapter width, H heads, D head width.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..audio.windows import audio_windows_for_frames, gather_audio_windows
from .adapter import AudioAdapter, AudioBlockKV, AudioConditioning

# transformer_options key under which a guider names the batch chunks (``cond_or_uncond`` values) that carry audio
AUDIO_CHUNKS_KEY = "fantasytalking_audio_chunks"
# ``cond_or_uncond`` values that carry audio, by the sampler the patch is used with:
# the FantasyTalking guider and DualCFGGuider (regular) evaluate [negative, positive without audio, positive with
# audio] as conds 0, 1, 2; KSampler / CFGGuider evaluate [positive, negative] as 0, 1.
AUDIO_CHUNKS = {"dual_cfg": (2,), "cfg": (0,)}

AUDIO_PASS_NAMESPACE = uuid.UUID("5d0c7a8e-3f1b-4f9e-9a57-2b8f6c1e0d43")
"""Namespace of the audio pass's cond uuids (:func:`audio_pass_conds`)."""

# (q, k, v, transformer_options) -> out; q/k/v/out [B, S, H*D] (ComfyUI's optimized_attention with the heads bound)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def audio_pass_conds(positive: list[dict]) -> list[dict]:
    """The positive prompt's conds (ComfyUI's processed conds, each with its ``uuid``) for the audio pass: the same
    conditioning under other uuids, derived from the originals so that they stay the same over a run.

    Why: the no-audio and the audio pass both evaluate the positive prompt, and ComfyUI tells conds apart by uuid
    (``transformer_options["uuids"]``). Under one uuid, a cache keyed by it (core EasyCache) stores the audio pass's
    output for the no-audio pass too, and audio guidance ``audio_cfg (pa - p)`` vanishes on every cached step.
    """
    return [{**cond, "uuid": uuid.uuid5(AUDIO_PASS_NAMESPACE, str(cond["uuid"]))} if cond.get("uuid") else cond
            for cond in positive]


@dataclass(frozen=True)
class NativeAudio:
    """What every patched block needs, made once by the patch node (CPU, float32).

    Attributes:
        windows: [1, F, W, P] projected audio tokens, one window per latent frame of the whole video.
        k_lens: [F] valid slots per window.
        scale: audio strength for the rows that carry audio.
        audio_chunks: ``cond_or_uncond`` values that carry audio unless the sampler's guider names them
            (``transformer_options[AUDIO_CHUNKS_KEY]``).
    """

    windows: torch.Tensor
    k_lens: torch.Tensor
    scale: float
    audio_chunks: tuple[int, ...]


@torch.no_grad()
def native_audio(adapter: AudioAdapter, features: torch.Tensor, num_frames: int, scale: float,
                 audio_chunks: tuple[int, ...]) -> NativeAudio:
    """Project the recording's features once (float32, where the projection's weights are) and cut the windows.

    Args:
        features: [L, 768] wav2vec2 features of the cropped recording; num_frames: video frames (4n+1) they cover.
    """
    windows = audio_windows_for_frames(features.shape[0], num_frames)
    device = adapter.proj.proj.weight.device
    tokens = gather_audio_windows(adapter.proj(features[None].to(device)), windows).cpu()
    return NativeAudio(tokens, windows.k_lens_tensor(), float(scale), tuple(audio_chunks))


def chunk_scales(cond_or_uncond: Sequence[int], audio_chunks: Collection[int], batch: int,
                 scale: float) -> torch.Tensor:
    """[B] audio scale per batch row: ``scale`` on the rows of chunks in ``audio_chunks``, 0 elsewhere.

    ComfyUI concatenates equally sized chunks, one per entry of ``cond_or_uncond``, along the batch.
    """
    if not cond_or_uncond or batch % len(cond_or_uncond):
        raise ValueError(f"a batch of {batch} rows does not split into chunks {list(cond_or_uncond)}.")
    rows = batch // len(cond_or_uncond)
    per_chunk = [scale if c in audio_chunks else 0.0 for c in cond_or_uncond]
    return torch.tensor(per_chunk, dtype=torch.float32).repeat_interleave(rows)


def window_frames(window) -> list[int]:
    """The latent frames a ComfyUI context-window call holds, in order: the window's ``index_list``, after the
    frame before it when ComfyUI's causal fix prepends that one (``causal_anchor_index``, stripped afterwards)."""
    anchor = getattr(window, "causal_anchor_index", None)
    return ([anchor] if anchor is not None and anchor >= 0 else []) + list(window.index_list)


def conditioning_for_call(audio: NativeAudio, transformer_options: dict, batch: int, latent_frames: int,
                          tokens_per_frame: int | None = None) -> AudioConditioning:
    """The audio conditioning of one ComfyUI model call.

    Args:
        transformer_options: ComfyUI's per-call options (``cond_or_uncond``, optionally ``context_window`` and
            :data:`AUDIO_CHUNKS_KEY`).
        batch: rows of the call; latent_frames: latent frames the call's tokens hold.
        tokens_per_frame: patch rows x patch columns of the call's latent (``grid_sizes``): the call's tokens must
            be exactly ``latent_frames`` x this many (a sequence-parallel pack that hands the blocks a shard of the
            tokens is refused instead of having its shard grouped into the wrong frames).
    """
    windows, k_lens = audio.windows, audio.k_lens
    window = transformer_options.get("context_window")
    if window is not None:  # ComfyUI's context windows: this call sees only the window's latent frames
        index = torch.as_tensor(window_frames(window), dtype=torch.long)
        if int(index.max()) >= windows.shape[1]:
            raise ValueError(f"context window frame {int(index.max())} is past the {windows.shape[1]} latent frames "
                             "the audio features were made for.")
        windows, k_lens = windows[:, index], k_lens[index]
    if windows.shape[1] != latent_frames:
        raise ValueError(
            f"the latent has {latent_frames} latent frames but the audio features were made for {windows.shape[1]} "
            f"({4 * windows.shape[1] - 3} video frames): give the video length node (e.g. WanImageToVideo) the "
            "frame count FantasyTalking Audio Encode reports.")
    chunks = transformer_options.get(AUDIO_CHUNKS_KEY, audio.audio_chunks)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0] * batch
    return AudioConditioning(windows, k_lens, chunk_scales(cond_or_uncond, chunks, batch, audio.scale),
                             tokens_per_frame)


class AudioCrossAttention:
    """A Wan-layout I2V cross-attention forward with the FantasyTalking audio branch (one per block).

    Call signature as ComfyUI's ``WanI2VCrossAttention.forward``. Holds references only (the module, its block's
    k/v, the run's audio): nothing is kept between calls.
    """

    def __init__(self, attn: nn.Module, kv: AudioBlockKV, audio: NativeAudio, attention: Attention,
                 image_attention: Attention | None = None):
        self.attn, self.kv, self.audio = attn, kv, audio
        self.attention = attention
        self.image_attention = image_attention or attention

    def __call__(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int,
                 transformer_options: dict | None = None) -> torch.Tensor:
        """x [B, S, dim] (``norm3`` output), context [B, context_img_len + L, dim] -> [B, S, dim]."""
        options = transformer_options or {}
        attn = self.attn
        context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        q = attn.norm_q(attn.q(x))
        out = self.attention(q, attn.norm_k(attn.k(context)), attn.v(context), options)
        out = out + self.image_attention(q, attn.norm_k_img(attn.k_img(context_img)), attn.v_img(context_img), options)
        grid = options.get("grid_sizes")  # (latent frames, patch rows, patch columns) of this call's latent
        latent_frames = self.audio.windows.shape[1] if grid is None else int(grid[0])
        tokens_per_frame = None if grid is None else int(grid[1]) * int(grid[2])
        cond = conditioning_for_call(self.audio, options, x.shape[0], latent_frames, tokens_per_frame)
        heads = attn.num_heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # ComfyUI's attention on [B, S, H*D]: its attention options (flash, overrides) apply here too; the one
            # for short key sets, as for the CLIP tokens (ComfyUI keeps sage off there: "can cause NaNs")
            return self.image_attention(q.flatten(2), k.flatten(2), v.flatten(2), options).unflatten(2, (heads, -1))

        audio = self.kv(q.unflatten(2, (heads, -1)), cond, attend=attend)  # [B, S, H, D] or None
        if audio is not None:
            out = out + audio.flatten(2)
        return attn.o(out)
