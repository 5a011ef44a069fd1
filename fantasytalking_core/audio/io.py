"""Audio input: decode files with PyAV, accept ComfyUI AUDIO values, mix to mono, resample to 16 kHz.

Conventions used throughout:

* A waveform is a float32 ``torch.Tensor``; multichannel audio is ``[C, T]`` (channels, samples), mono is ``[T]``.
* Sample values are in full-scale units (1.0 = digital full scale). Integer PCM is scaled the way libsndfile and
  librosa scale it (int16 / 32768, int32 / 2**31, uint8 (x - 128) / 128). Floats are kept as they are, including
  values beyond +-1: the wav2vec2 normalisation makes the level irrelevant, and clamping would distort.
* Sample rates are in Hz, durations in seconds.

The official FantasyTalking code reads audio with ``librosa.load(path, sr=16000)``: it averages all channels, then
resamples with soxr (``soxr_hq``) and fixes the length to ``ceil(T * 16000 / sr)``. This module does the same steps
in the same order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import AudioInputError, MissingDependencyError

TARGET_SAMPLE_RATE = 16000
"""Sample rate wav2vec2-base-960h was trained on, in Hz."""

# Plausible sample rates; anything outside is a mistake (e.g. a sample count passed as the rate).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_536_000
# More channels than this almost always means a [B, T, C] tensor was passed where [B, C, T] was expected.
MAX_CHANNELS = 32

ResampleBackend = Literal["soxr", "torchaudio"]
SUPPORTED_FORMATS_HINT = "wav, flac, mp3, ogg/opus, m4a/aac, or a mp4/mov/webm video with an audio track"


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded recording.

    Attributes:
        waveform: float32 tensor [C, T], C >= 1 channels and T >= 1 samples, all finite, full-scale units.
        sample_rate: samples per second (Hz).
    """

    waveform: torch.Tensor
    sample_rate: int

    @property
    def num_channels(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[1])

    @property
    def duration_s(self) -> float:
        """Length in seconds (T / sample_rate), the value ``librosa.get_duration`` gives for the file."""
        return self.num_samples / self.sample_rate


# --------------------------------------------------------------------------------------------------------------------
# Sample formats and validation
# --------------------------------------------------------------------------------------------------------------------


def samples_to_float32(samples: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Convert PCM samples of any common dtype to float32 full-scale units, keeping the shape.

    Args:
        samples: tensor or array of int16, int32, uint8 or any float dtype, any shape.

    Returns:
        float32 CPU tensor of the same shape. int16 is divided by 32768, int32 by 2**31, uint8 maps to
        (x - 128) / 128; floats are cast without rescaling.

    Raises:
        AudioInputError: for dtypes without a standard full scale (int64, bool, complex, ...).
    """
    if isinstance(samples, np.ndarray):
        if samples.dtype == np.int16:
            return torch.from_numpy(samples.astype(np.float32) / 32768.0)
        if samples.dtype == np.int32:
            # float64 first so that int32 values are not rounded before the division.
            return torch.from_numpy((samples.astype(np.float64) / 2147483648.0).astype(np.float32))
        if samples.dtype == np.uint8:
            return torch.from_numpy((samples.astype(np.float32) - 128.0) / 128.0)
        if np.issubdtype(samples.dtype, np.floating):
            return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        raise AudioInputError(
            f"Audio samples of dtype {samples.dtype} have no standard full scale. "
            "Convert them to float in [-1, 1] (or int16/int32 PCM) first."
        )
    if not isinstance(samples, torch.Tensor):
        raise AudioInputError(f"Audio samples must be a torch.Tensor or numpy array, got {type(samples).__name__}.")
    x = samples.detach().cpu()
    if x.dtype == torch.int16:
        return x.to(torch.float32) / 32768.0
    if x.dtype == torch.int32:
        return (x.to(torch.float64) / 2147483648.0).to(torch.float32)
    if x.dtype == torch.uint8:
        return (x.to(torch.float32) - 128.0) / 128.0
    if x.is_floating_point():
        return x.to(torch.float32)
    raise AudioInputError(
        f"Audio samples of dtype {x.dtype} have no standard full scale. "
        "Convert them to float in [-1, 1] (or int16/int32 PCM) first."
    )


def check_sample_rate(sample_rate: Any) -> int:
    """Return ``sample_rate`` as an int in Hz, or raise AudioInputError if it is not a plausible rate."""
    try:
        sr_float = float(sample_rate)
    except (TypeError, ValueError):
        raise AudioInputError(f"Sample rate must be a number of Hz, got {sample_rate!r}.") from None
    if not math.isfinite(sr_float) or sr_float != int(sr_float):
        raise AudioInputError(f"Sample rate must be a whole number of Hz, got {sample_rate!r}.")
    sr = int(sr_float)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"Sample rate {sr} Hz is not a valid audio rate (expected {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, "
            "e.g. 16000, 44100 or 48000). Check that the rate and the sample count were not swapped."
        )
    return sr


def validate_waveform(waveform: torch.Tensor, sample_rate: int, source: str = "audio") -> torch.Tensor:
    """Check a [C, T] float waveform and return it unchanged.

    Args:
        waveform: float tensor [C, T].
        sample_rate: Hz, used for the messages only.
        source: what the audio is (a file name, "AUDIO input"), used for the messages only.

    Raises:
        AudioInputError: no channels, no samples, or NaN / infinite samples. Digital silence is valid (the
            normalisation divides by sqrt(var + 1e-7), never by zero) and passes unchanged.
    """
    if waveform.ndim != 2:
        raise AudioInputError(f"{source}: expected a [channels, samples] waveform, got shape {list(waveform.shape)}.")
    channels, samples = waveform.shape
    if channels == 0 or samples == 0:
        raise AudioInputError(
            f"{source} is empty ({channels} channels, {samples} samples). Give a recording with speech in it."
        )
    finite = torch.isfinite(waveform)
    if not bool(finite.all()):
        bad = ~finite
        n_nan = int(torch.isnan(waveform).sum())
        n_inf = int(bad.sum()) - n_nan
        first = int(bad.any(dim=0).nonzero()[0, 0])
        raise AudioInputError(
            f"{source} contains {n_nan} NaN and {n_inf} infinite samples (first at {first / sample_rate:.3f} s). "
            "The recording or the node that produced it is broken: re-export the audio, or fix the upstream node."
        )
    return waveform


# --------------------------------------------------------------------------------------------------------------------
# Sources: ComfyUI AUDIO values and files
# --------------------------------------------------------------------------------------------------------------------


def from_comfy_audio(audio: Mapping[str, Any]) -> DecodedAudio:
    """Read ComfyUI's AUDIO value.

    Args:
        audio: ``{"waveform": [B, C, T] tensor, "sample_rate": int}``; B must be 1. [C, T] and [T] waveforms are
            accepted too. Samples may be float (any precision), int16, int32 or uint8.

    Returns:
        DecodedAudio with a float32 [C, T] waveform.

    Raises:
        AudioInputError: not an AUDIO value, a batch of several recordings, an implausible shape or sample rate,
            empty, or non-finite samples.
    """
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise AudioInputError(
            'Expected a ComfyUI AUDIO value {"waveform": [B, C, T] tensor, "sample_rate": int}, '
            f"got {type(audio).__name__}{' with keys ' + str(sorted(audio)) if isinstance(audio, Mapping) else ''}."
        )
    sr = check_sample_rate(audio["sample_rate"])
    wave = samples_to_float32(audio["waveform"])
    if wave.ndim == 3:
        if wave.shape[0] != 1:
            raise AudioInputError(
                f"The AUDIO input holds a batch of {wave.shape[0]} recordings; FantasyTalking drives one video "
                "from one recording. Select or concatenate one recording first."
            )
        wave = wave[0]
    elif wave.ndim == 1:
        wave = wave[None]
    elif wave.ndim != 2:
        raise AudioInputError(f"AUDIO waveform must be [batch, channels, samples], got shape {list(wave.shape)}.")
    if wave.shape[0] > MAX_CHANNELS:
        raise AudioInputError(
            f"AUDIO waveform has {wave.shape[0]} channels and {wave.shape[1]} samples. Expected [batch, channels, "
            "samples]; this looks like [batch, samples, channels]: transpose the last two dimensions."
        )
    return DecodedAudio(validate_waveform(wave.contiguous(), sr, "AUDIO input"), sr)


def _frame_to_float32(frame: Any) -> np.ndarray:
    """One PyAV AudioFrame -> float32 [C, n] array in full-scale units."""
    channels = len(frame.layout.channels)
    arr = frame.to_ndarray()
    if not frame.format.is_planar:
        # Packed formats come back as [1, n * C], interleaved.
        arr = arr.reshape(-1, channels).T
    if arr.dtype == np.int64:
        # s64 PCM is vanishingly rare; scale it like the other integer formats.
        return (arr.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    return samples_to_float32(np.ascontiguousarray(arr)).numpy()


def decode_audio_file(path: str | os.PathLike[str]) -> DecodedAudio:
    """Decode the first audio stream of a file with PyAV (FFmpeg).

    Handles wav, flac, mp3, ogg/opus/vorbis, m4a/aac and the audio track of mp4/mov/mkv/webm videos.

    Args:
        path: the file.

    Returns:
        DecodedAudio: float32 [C, T] waveform at the stream's own sample rate.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioInputError: not a media file, no audio track, undecodable, empty, or non-finite samples.
    """
    import av  # deferred: importing FFmpeg bindings is slow and most callers pass AUDIO values

    p = Path(path)
    if not p.is_file():
        if p.exists():
            raise AudioInputError(f"{p} is a folder, not an audio file.")
        raise FileNotFoundError(f"Audio file not found: {p}")
    try:
        container = av.open(str(p), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise AudioInputError(
            f"{p.name} is not an audio or video file that FFmpeg can read ({e}). Use {SUPPORTED_FORMATS_HINT}."
        ) from None
    with container:
        if not container.streams.audio:
            raise AudioInputError(f"{p.name} has no audio track. Use {SUPPORTED_FORMATS_HINT}.")
        stream = container.streams.audio[0]
        pieces: list[np.ndarray] = []
        sample_rate: int | None = None
        channels: int | None = None
        try:
            for frame in container.decode(stream):
                arr = _frame_to_float32(frame)
                if sample_rate is None:
                    sample_rate, channels = int(frame.sample_rate), arr.shape[0]
                elif frame.sample_rate != sample_rate or arr.shape[0] != channels:
                    raise AudioInputError(
                        f"{p.name}: the audio track changes format mid-stream ({sample_rate} Hz x {channels} ch -> "
                        f"{frame.sample_rate} Hz x {arr.shape[0]} ch). Re-export it with a fixed format."
                    )
                pieces.append(arr)
        except av.error.FFmpegError as e:
            decoded = sum(a.shape[1] for a in pieces)
            where = f" after {decoded / sample_rate:.2f} s" if sample_rate else ""
            raise AudioInputError(f"{p.name}: decoding failed{where} ({e}). The file is damaged; re-export it.") from None
    if sample_rate is None or channels is None:
        raise AudioInputError(f"{p.name}: the audio track holds no samples. Give a recording with speech in it.")
    sr = check_sample_rate(sample_rate)
    wave = torch.from_numpy(np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0])
    return DecodedAudio(validate_waveform(wave, sr, p.name), sr)


def load_audio(source: Mapping[str, Any] | str | os.PathLike[str] | DecodedAudio) -> DecodedAudio:
    """Decode any supported source: a ComfyUI AUDIO dict, a file path, or an already decoded recording."""
    if isinstance(source, DecodedAudio):
        return DecodedAudio(validate_waveform(source.waveform, source.sample_rate), check_sample_rate(source.sample_rate))
    if isinstance(source, Mapping):
        return from_comfy_audio(source)
    if isinstance(source, (str, os.PathLike)):
        return decode_audio_file(source)
    raise AudioInputError(
        f"Audio must be a ComfyUI AUDIO value or a file path, got {type(source).__name__}."
    )


# --------------------------------------------------------------------------------------------------------------------
# Mono and resampling
# --------------------------------------------------------------------------------------------------------------------


def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """Average all channels (librosa's mono, not the left channel).

    Args:
        waveform: float tensor [C, T] (or [T], returned as is).

    Returns:
        float32 tensor [T].
    """
    if waveform.ndim == 1:
        return waveform.to(torch.float32)
    if waveform.ndim != 2:
        raise AudioInputError(f"to_mono expects [channels, samples], got shape {list(waveform.shape)}.")
    if waveform.shape[0] == 1:
        return waveform[0].to(torch.float32)
    return waveform.to(torch.float32).mean(dim=0)


def resampled_length(num_samples: int, orig_sr: int, target_sr: int = TARGET_SAMPLE_RATE) -> int:
    """Length after resampling, librosa's rule: ``ceil(T * (target_sr / orig_sr))`` evaluated in float64."""
    return int(np.ceil(num_samples * (float(target_sr) / orig_sr)))


def check_resample_backend(backend: str) -> ResampleBackend:
    """``backend`` itself when it is "soxr" or "torchaudio", else a ValueError naming both."""
    if backend not in ("soxr", "torchaudio"):
        raise ValueError(f"resample backend must be 'soxr' (the official librosa result) or 'torchaudio', got {backend!r}")
    return backend


def resample(
    waveform: torch.Tensor,
    orig_sr: int,
    target_sr: int = TARGET_SAMPLE_RATE,
    backend: ResampleBackend = "soxr",
) -> torch.Tensor:
    """Band-limited resampling of a mono waveform.

    Args:
        waveform: float tensor [T] at ``orig_sr`` Hz.
        orig_sr, target_sr: sample rates in Hz.
        backend: "soxr" (libsoxr "HQ", what the official ``librosa.load`` uses: the official numbers in every
            environment) or "torchaudio" (windowed-sinc, torchaudio defaults; only when asked for, since it
            differs from the official result).

    Returns:
        float32 tensor [ceil(T * target_sr / orig_sr)]; the input itself when the rates are equal.
    """
    if waveform.ndim != 1:
        raise AudioInputError(f"resample expects a mono [samples] waveform, got shape {list(waveform.shape)}.")
    orig_sr, target_sr = check_sample_rate(orig_sr), check_sample_rate(target_sr)
    x = waveform.detach().cpu().to(torch.float32)
    if orig_sr == target_sr:
        return x
    n_out = resampled_length(x.shape[0], orig_sr, target_sr)
    if check_resample_backend(backend) == "torchaudio":
        import torchaudio.functional as taf

        y = taf.resample(x[None], orig_sr, target_sr)[0]
    else:
        try:
            import soxr
        except ImportError:  # no wheel for Windows on ARM
            raise MissingDependencyError(f"resampling {orig_sr} Hz audio to {target_sr} Hz needs soxr, which is "
                                         "not installed (it has no wheel for Windows on ARM): pip install soxr "
                                         "(builds with a C compiler), or give a 16 kHz recording.") from None
        y = torch.from_numpy(soxr.resample(x.numpy(), orig_sr, target_sr, quality="HQ"))
    # Same length fix as librosa (zero-pad or trim to ceil(T * ratio)).
    if y.shape[0] < n_out:
        y = torch.nn.functional.pad(y, (0, n_out - y.shape[0]))
    return y[:n_out].to(torch.float32).contiguous()


def load_mono_16k(
    source: Mapping[str, Any] | str | os.PathLike[str] | DecodedAudio,
    backend: ResampleBackend = "soxr",
) -> tuple[torch.Tensor, float]:
    """Decode, average the channels and resample to 16 kHz, like ``librosa.load(path, sr=16000)``.

    Returns:
        (waveform [T16] float32 at 16 kHz, duration of the original recording in seconds).
    """
    audio = load_audio(source)
    mono = to_mono(audio.waveform)
    return resample(mono, audio.sample_rate, TARGET_SAMPLE_RATE, backend), audio.duration_s
