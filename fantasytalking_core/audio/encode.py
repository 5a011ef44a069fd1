"""FantasyTalking audio features: wav2vec2-base-960h ``last_hidden_state`` for a recording, the official way.

The official pipeline (Fantasy-AMAP/fantasy-talking, infer.py + utils.get_audio_features) does:

1. ``duration = librosa.get_duration(filename=audio_path)``
2. ``num_frames = min(int(fps * duration // 4) * 4 + 5, max_num_frames)``          -> :func:`frames_for_duration`
3. ``audio = librosa.load(audio_path, sr=16000)``: mean of channels, soxr resample   -> :mod:`.io`
4. ``audio[: int(num_frames / fps * 16000)]``                                        -> :func:`crop_for_frames`
5. ``Wav2Vec2Processor(...)(segment, sampling_rate=16000).input_values``:
   ``(x - mean) / sqrt(var + 1e-7)`` over the whole cropped segment                  -> :func:`normalize_utterance`
6. ``Wav2Vec2Model(input_values).last_hidden_state`` -> [1, L, 768], 50 tokens/s     -> :func:`encode_audio`

:func:`extract_audio_features` runs all of it; the ComfyUI nodes and the CLI call that one.

Long recordings (section "Chunking" in :func:`encode_audio`) are encoded in bounded memory: the convolutional
front end is computed block by block *exactly* (its one global operation, the GroupNorm of the first conv layer,
uses statistics gathered over the whole utterance in a first pass), and the transformer runs on overlapping
windows of ``chunk_seconds`` that are stitched at the middle of each overlap. A clip that fits in one window gives
the one-shot result (measured max |diff| 4e-6 with a base-size model); a clip that is split differs from a one-shot
run because wav2vec2's self-attention sees the whole utterance (see docs/benchmarks.md for measured figures).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Wav2Vec2Model

from ..errors import AudioInputError, ModelFileError
from . import io as audio_io
from .io import DecodedAudio, ResampleBackend
from .rules import (DEFAULT_FPS, DEFAULT_MAX_FRAMES, SAMPLE_RATE, check_long_enough, crop_for_frames,
                    frames_for_duration, receptive_field, recording_warnings, wav2vec2_num_tokens)
from .wav2vec2 import FIX_HINT

logger = logging.getLogger(__name__)

NORM_EPS = 1e-7
"""Wav2Vec2FeatureExtractor's epsilon: (x - mean) / sqrt(var + 1e-7)."""
# Transformer windows. 60 s keeps every clip up to a minute exact (one window, the official one-shot result) while
# memory stays ~1.1 GB for a base model on CPU (SDPA attention does not materialise the 3000x3000 score matrix)
# and the attention cost is still small next to the linear layers. 10 s of overlap gives every kept token >= 5 s
# of context on each side of a seam, at 1.2x the cost of no overlap.
DEFAULT_CHUNK_SECONDS = 60.0
DEFAULT_OVERLAP_SECONDS = 10.0
# The exact convolutional front end runs on blocks of this many seconds of output; it only bounds memory
# (the result does not depend on it). 10 s of base-size front end peaks at about 0.3 GB of activations.
FRONTEND_BLOCK_SECONDS = 10.0

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: work units done so far out of ``total``."""


# ====================================================================================================================
# Per-utterance normalisation (Wav2Vec2FeatureExtractor, do_normalize=True)
# ====================================================================================================================


def utterance_stats(waveform: torch.Tensor, block_samples: int = 1 << 20) -> tuple[float, float]:
    """Mean and population variance of a waveform [T], accumulated block by block in float64.

    Blocks are merged with Chan et al.'s pairwise update, so memory stays bounded by one block and the result
    does not depend on ``block_samples`` beyond float64 rounding.
    """
    if waveform.ndim != 1 or waveform.numel() == 0:
        raise AudioInputError(f"Expected a non-empty mono waveform [samples], got shape {list(waveform.shape)}.")
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, waveform.shape[0], block_samples):
        block = waveform[start : start + block_samples].to(torch.float64)
        n_b = block.numel()
        mean_b = float(block.mean())
        m2_b = float(((block - mean_b) ** 2).sum())
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    return mean, m2 / count


def _norm_constants(stats: tuple[float, float]) -> tuple[float, float]:
    """(mean, sqrt(var + eps)), the two numbers of the utterance normalisation."""
    mean, var = stats
    return mean, math.sqrt(var + NORM_EPS)


def normalize_utterance(waveform: torch.Tensor, stats: tuple[float, float] | None = None) -> torch.Tensor:
    """Zero mean, unit variance, exactly as Wav2Vec2FeatureExtractor(do_normalize=True) does for one utterance.

    ``(x - mean) / sqrt(var + 1e-7)`` with the statistics of the whole waveform. Digital silence gives zeros (the
    epsilon keeps the denominator >= 3.2e-4), never NaN.

    Args:
        waveform: float tensor [T], 16 kHz, the whole utterance the model will see (i.e. after cropping).
        stats: (mean, population variance) to use, e.g. from :func:`utterance_stats`; computed when None.

    Returns:
        float32 tensor [T].
    """
    mean, denom = _norm_constants(stats if stats is not None else utterance_stats(waveform))
    x = waveform.to(torch.float32)
    return (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(denom, dtype=torch.float32)


def encoder_windows(num_tokens: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split ``num_tokens`` into overlapping transformer windows.

    Consecutive windows overlap by ``overlap`` tokens; the seam between two windows is the middle of their overlap,
    so every kept token has at least ``overlap // 2`` tokens of context on the seam side.

    Returns:
        list of (start, end, keep_start, keep_end): the model sees tokens [start, end) and its outputs for
        [keep_start, keep_end) are kept. The keep ranges tile [0, num_tokens) in order.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    if num_tokens <= window:
        return [(0, num_tokens, 0, num_tokens)]
    step = window - overlap
    count = math.ceil((num_tokens - window) / step) + 1
    starts = [min(i * step, num_tokens - window) for i in range(count)]
    out = []
    for i, start in enumerate(starts):
        end = start + window
        keep_start = 0 if i == 0 else (start + starts[i - 1] + window) // 2
        keep_end = num_tokens if i == count - 1 else (starts[i + 1] + end) // 2
        out.append((start, end, keep_start, keep_end))
    return out


def _check_model(model: Any) -> Wav2Vec2Model:
    if not isinstance(model, Wav2Vec2Model):
        raise TypeError(f"encode_audio needs a transformers Wav2Vec2Model (see load_wav2vec2), got {type(model).__name__}")
    if model.config.feat_extract_norm != "group":
        raise ModelFileError(f"This wav2vec2 uses feat_extract_norm={model.config.feat_extract_norm!r}. {FIX_HINT}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise TypeError(
            f"encode_audio computes wav2vec2 in float32, as the official code does; this model holds "
            f"{', '.join(sorted(str(d) for d in dtypes))} weights. Load it with load_wav2vec2 or call model.float()."
        )
    return model


@torch.inference_mode()
def encode_audio(
    model: Wav2Vec2Model,
    waveform_16k: torch.Tensor,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """wav2vec2 ``last_hidden_state`` of one utterance, in bounded memory.

    Args:
        model: a float32 Wav2Vec2Model (from :func:`load_wav2vec2`), on any device.
        waveform_16k: float tensor [T], mono, 16 kHz, NOT normalised (this function normalises it over the whole
            utterance, like Wav2Vec2FeatureExtractor). T >= 400 samples (25 ms, one token).
        chunk_seconds: longest stretch of audio one transformer call sees (> 0). Bounds memory and time: the
            attention cost grows with its square. Clips up to this length are encoded in one call.
        overlap_seconds: overlap between consecutive transformer windows, 0 <= overlap < chunk. Stitching happens
            at the middle of each overlap, so every kept token has >= overlap/2 seconds of context on each side.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        float32 CPU tensor [L, hidden_size], L = :func:`wav2vec2_num_tokens` (T) (~50 per second).

    Chunking:
        1. mean/variance of the utterance, streamed (:func:`utterance_stats`).
        2. pass 1 over the first conv layer, block by block, to get the per-channel statistics of its GroupNorm
           over the whole utterance (that GroupNorm normalises each channel over time, the only global step of the
           conv front end).
        3. pass 2: conv front end + feature projection on blocks of FRONTEND_BLOCK_SECONDS whose inputs overlap
           by the receptive field (400 samples), using the global GroupNorm statistics: identical to one-shot up to
           float rounding for any length.
        4. the transformer (positional conv + 12 self-attention layers) on windows of ``chunk_seconds`` overlapping
           by ``overlap_seconds``. Exact when the clip fits in one window; otherwise approximate, because
           self-attention in a one-shot run mixes in context from the whole utterance.
    """
    model = _check_model(model)
    if not isinstance(waveform_16k, torch.Tensor) or waveform_16k.ndim != 1:
        shape = list(waveform_16k.shape) if isinstance(waveform_16k, torch.Tensor) else type(waveform_16k).__name__
        raise AudioInputError(f"encode_audio expects a mono 16 kHz waveform [samples], got {shape}.")
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
    if not (math.isfinite(overlap_seconds) and 0 <= overlap_seconds < chunk_seconds):
        raise ValueError(f"overlap_seconds must be >= 0 and < chunk_seconds ({chunk_seconds}), got {overlap_seconds!r}")
    cfg = model.config
    field, hop = receptive_field(cfg.conv_kernel, cfg.conv_stride)
    wave = waveform_16k.detach().to("cpu", torch.float32)
    check_long_enough(wave.shape[0], cfg.conv_kernel, cfg.conv_stride)
    num_tokens = wav2vec2_num_tokens(wave.shape[0], cfg.conv_kernel, cfg.conv_stride)
    audio_io.validate_waveform(wave[None], SAMPLE_RATE, "16 kHz waveform")

    tokens_per_second = SAMPLE_RATE / hop
    window = max(1, round(chunk_seconds * tokens_per_second))
    overlap = min(window - 1, round(overlap_seconds * tokens_per_second))
    windows = encoder_windows(num_tokens, window, overlap)
    block_tokens = max(1, round(FRONTEND_BLOCK_SECONDS * tokens_per_second))
    blocks = [(a, min(a + block_tokens, num_tokens)) for a in range(0, num_tokens, block_tokens)]
    k0, s0 = cfg.conv_kernel[0], cfg.conv_stride[0]
    # Every conv0 output frame counts in its GroupNorm statistics, also the trailing ones no token uses.
    frames0_total = (wave.shape[0] - k0) // s0 + 1
    frames0_per_block = block_tokens * (hop // s0)
    stat_blocks = range(0, frames0_total, frames0_per_block)
    total, done = len(stat_blocks) + len(blocks) + len(windows), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean, denom = _norm_constants(utterance_stats(wave))

    def normalized(start: int, stop: int) -> torch.Tensor:
        seg = (wave[start:stop] - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(denom, dtype=torch.float32)
        return seg.to(device, dtype)[None, None]  # [1, 1, n]

    conv0 = model.feature_extractor.conv_layers[0]

    # Pass 1: per-channel mean/variance of conv0's output over the whole utterance (Chan merge in float64),
    # on non-overlapping blocks of conv0 frames.
    count, ch_mean, ch_m2 = 0, None, None
    for f0 in stat_blocks:
        f1 = min(f0 + frames0_per_block, frames0_total)
        y = conv0.conv(normalized(f0 * s0, (f1 - 1) * s0 + k0))[0].float()  # [C0, f1 - f0]
        var_b, mean_b = torch.var_mean(y, dim=1, correction=0)
        # float64 on the CPU: Apple's MPS has no float64 (the statistics are [C0] vectors: no cost)
        n_b, mean_b, m2_b = y.shape[1], mean_b.cpu().double(), var_b.cpu().double() * y.shape[1]
        if ch_mean is None:
            count, ch_mean, ch_m2 = n_b, mean_b, m2_b
        else:
            tot = count + n_b
            delta = mean_b - ch_mean
            ch_mean = ch_mean + delta * (n_b / tot)
            ch_m2 = ch_m2 + m2_b + delta * delta * (count * n_b / tot)
            count = tot
        tick()
    # GroupNorm(x) = (x - mean) / sqrt(var + eps) * w + b, folded into x * scale + shift; kept in float32 so
    # that half-precision models normalise as accurately as torch's GroupNorm (which upcasts internally).
    gn = conv0.layer_norm
    inv_std = 1.0 / torch.sqrt(ch_m2 / count + gn.eps)
    weight, bias = gn.weight.detach().cpu().double(), gn.bias.detach().cpu().double()
    gn_scale = (weight * inv_std).to(device, torch.float32)[:, None]
    gn_shift = (bias - ch_mean * weight * inv_std).to(device, torch.float32)[:, None]

    # Pass 2: exact conv front end + feature projection, block by block.
    hidden = torch.empty(num_tokens, cfg.hidden_size, dtype=dtype, device=device)
    for a, b in blocks:
        x = conv0.conv(normalized(a * hop, (b - 1) * hop + field))
        x = conv0.activation((x.float() * gn_scale + gn_shift).to(dtype))
        for layer in model.feature_extractor.conv_layers[1:]:
            x = layer(x)
        if x.shape[-1] != b - a:  # geometry guard: would mean a wrong receptive-field computation
            raise RuntimeError(f"front-end block gave {x.shape[-1]} tokens, expected {b - a}")
        projected, _ = model.feature_projection(x.transpose(1, 2))
        hidden[a:b] = projected[0]
        tick()

    # Transformer on overlapping windows, stitched at the middle of each overlap.
    out = torch.empty(num_tokens, cfg.hidden_size, dtype=torch.float32)
    for start, end, keep_start, keep_end in windows:
        states = model.encoder(hidden[start:end][None]).last_hidden_state[0]
        out[keep_start:keep_end] = states[keep_start - start : keep_end - start].float().cpu()
        tick()
    return out


@dataclass(frozen=True)
class AudioFeatures:
    """Everything the video pipeline needs from the recording.

    Attributes:
        features: float32 [L, 768] wav2vec2 last_hidden_state, ~50 tokens per second of the cropped audio.
        num_frames: video frames (4k+1) by the official rule.
        fps: video frame rate.
        duration_s: length of the whole recording in seconds (before cropping).
        waveform_16k: float32 [T] mono 16 kHz audio actually encoded (cropped, not normalised); mux this into
            the video so sound and picture line up.
    """

    features: torch.Tensor
    num_frames: int
    fps: float
    duration_s: float
    waveform_16k: torch.Tensor

    sample_rate: int = SAMPLE_RATE

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_latent_frames(self) -> int:
        """Latent frames of Wan's VAE: (num_frames - 1) // 4 + 1."""
        return (self.num_frames - 1) // 4 + 1

    @property
    def video_duration_s(self) -> float:
        return self.num_frames / self.fps

    def warnings(self) -> list[str]:
        """What the user should know before a long run (:func:`~.rules.recording_warnings`)."""
        peak = float(self.waveform_16k.abs().max()) if self.waveform_16k.numel() else 0.0
        return recording_warnings(peak, self.duration_s, self.fps, self.num_frames)


def extract_audio_features(
    model: Wav2Vec2Model,
    audio: Mapping[str, Any] | str | os.PathLike[str] | DecodedAudio,
    fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    *,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    progress: ProgressCallback | None = None,
    resample_backend: ResampleBackend = "soxr",
) -> AudioFeatures:
    """Recording in, FantasyTalking audio features out (steps 1-6 of the module docstring).

    Args:
        model: wav2vec2-base-960h from :func:`load_wav2vec2`.
        audio: a ComfyUI AUDIO value ``{"waveform": [B=1, C, T], "sample_rate": int}``, an audio/video file path,
            or a :class:`~.audio_io.DecodedAudio`.
        fps: video frame rate (official default 23).
        max_frames: cap on the frame count (4k+1; official default 81), None for no cap.
        chunk_seconds, overlap_seconds, progress: see :func:`encode_audio`.
        resample_backend: see :func:`.audio_io.resample`.

    Raises:
        AudioInputError: empty, non-finite, shorter than 25 ms, not audio; FileNotFoundError: missing file.
    """
    decoded = audio_io.load_audio(audio)
    duration_s, sample_rate = decoded.duration_s, decoded.sample_rate
    # Frame count from the original recording's length, as librosa.get_duration gives it in infer.py.
    num_frames = frames_for_duration(duration_s, fps, max_frames)
    mono = audio_io.to_mono(decoded.waveform)
    del decoded  # the multichannel original can be large; only the mono copy is needed from here
    # Resample the whole recording, then crop: the official order (it matters within a filter length of the cut).
    wave_16k = audio_io.resample(mono, sample_rate, SAMPLE_RATE, resample_backend)
    del mono
    wave_16k = crop_for_frames(wave_16k, num_frames, fps).clone()  # clone: do not pin the uncropped buffer
    features = AudioFeatures(encode_audio(model, wave_16k, chunk_seconds, overlap_seconds, progress), num_frames,
                             float(fps), duration_s, wave_16k)
    for warning in features.warnings():
        logger.warning("Audio: %s.", warning)
    return features
