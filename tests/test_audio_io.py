"""fantasytalking_core.audio.io: decoding, ComfyUI AUDIO values, mono mixing, resampling, bad input."""

from __future__ import annotations

import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soxr
import torch

from fantasytalking_core.audio import io as audio_io
from fantasytalking_core.audio.io import (
    DecodedAudio,
    decode_audio_file,
    from_comfy_audio,
    load_audio,
    load_mono_16k,
    resample,
    resampled_length,
    samples_to_float32,
    to_mono,
)
from fantasytalking_core.errors import AudioInputError

LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """Float [-1, 1] -> the sample array PyAV wants for ``fmt`` (packed formats interleaved as [1, T*C])."""
    base = fmt.rstrip("p")
    if base == "s16":
        arr = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    elif base == "s32":
        arr = np.round(x * 2147483647).astype(np.int32)
    else:
        arr = x.astype(np.float32)
    return arr if fmt.endswith("p") else np.ascontiguousarray(arr.T).reshape(1, -1)


def write_media(
    path: Path, x: np.ndarray, sr: int, codec: str, fmt: str, video_codec: str | None = None
) -> Path:
    """Encode float samples [C, T] into ``path`` with PyAV (optionally with a small video stream)."""
    channels = x.shape[0]
    with av.open(str(path), "w") as out:
        if video_codec:
            vs = out.add_stream(video_codec, rate=10)
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        stream = out.add_stream(codec, rate=sr)
        stream.layout, stream.format = LAYOUTS[channels], fmt
        for i in range(0, x.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(quantize(x[:, i : i + 1024], fmt), format=fmt, layout=LAYOUTS[channels])
            frame.sample_rate, frame.pts, frame.time_base = sr, i, Fraction(1, sr)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if video_codec:
            for k in range(int(x.shape[1] / sr * 10) + 1):
                vf = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
                vf.pts = k
                for packet in vs.encode(vf):
                    out.mux(packet)
            for packet in vs.encode(None):
                out.mux(packet)
    return path


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


# Left and right differ (frequency and level) so that a channel mix-up or a left-only decode is visible.
def stereo(sr: int, seconds: float = 0.5) -> np.ndarray:
    return np.stack([tone(440, sr, seconds, 0.5), tone(1000, sr, seconds, 0.25)])


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, codec, fmt, scale",
    [
        ("pcm16.wav", "pcm_s16le", "s16", 32768.0),
        ("pcm32.wav", "pcm_s32le", "s32", 2147483648.0),
        ("float.wav", "pcm_f32le", "flt", None),
        ("lossless.flac", "flac", "s16", 32768.0),
    ],
)
def test_lossless_files_decode_bit_exact_with_standard_int_scaling(tmp_path, name, codec, fmt, scale):
    x = stereo(44100)
    path = write_media(tmp_path / name, x, 44100, codec, fmt)
    audio = decode_audio_file(path)
    assert audio.sample_rate == 44100 and audio.waveform.dtype == torch.float32
    assert audio.waveform.shape == (2, x.shape[1])
    stored = quantize(x, fmt + "p").astype(np.float64)  # planar [C, T] of what was written
    expected = stored if scale is None else stored / scale
    np.testing.assert_array_equal(audio.waveform.numpy(), expected.astype(np.float32))
    assert audio.duration_s == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name, codec, fmt, sr, video",
    [
        ("speech.mp3", "libmp3lame", "fltp", 44100, None),
        ("speech.ogg", "libopus", "flt", 48000, None),
        ("speech.opus", "libopus", "flt", 48000, None),
        ("speech.m4a", "aac", "fltp", 44100, None),
        ("clip.mp4", "aac", "fltp", 48000, "mpeg4"),
        ("clip.mov", "aac", "fltp", 44100, "mpeg4"),
        ("clip.webm", "libopus", "flt", 48000, "libvpx"),
    ],
)
def test_lossy_and_video_files_decode_both_channels(tmp_path, name, codec, fmt, sr, video):
    x = stereo(sr)
    audio = decode_audio_file(write_media(tmp_path / name, x, sr, codec, fmt, video))
    assert audio.sample_rate == sr and audio.num_channels == 2
    # Codec priming/padding may add a few ms, never more.
    assert abs(audio.duration_s - 0.5) < 0.06
    mid = slice(int(0.1 * sr), int(0.4 * sr))  # away from codec edge transients
    left, right = audio.waveform[0, mid].numpy(), audio.waveform[1, mid].numpy()
    assert peak_hz(left, sr) == pytest.approx(440, abs=5)
    assert peak_hz(right, sr) == pytest.approx(1000, abs=5)
    assert rms(left) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
    assert rms(right) == pytest.approx(0.25 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize("channels", [1, 2, 6, 8])
def test_multichannel_wav_keeps_every_channel(tmp_path, channels):
    x = np.stack([tone(200 + 100 * c, 16000, 0.25, 0.1 * (c + 1)) for c in range(channels)])
    audio = decode_audio_file(write_media(tmp_path / f"c{channels}.wav", x, 16000, "pcm_s16le", "s16"))
    assert audio.num_channels == channels
    expected = quantize(x, "s16p").astype(np.float32) / 32768.0  # channel order kept, each channel its own tone
    np.testing.assert_array_equal(audio.waveform.numpy(), expected)


def test_text_file_is_refused_as_not_audio(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a recording\n" * 50)
    with pytest.raises(AudioInputError, match="notes.txt"):
        decode_audio_file(path)


def test_random_bytes_with_audio_extension_are_refused(tmp_path):
    path = tmp_path / "voice.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioInputError, match="voice.wav"):
        decode_audio_file(path)


def test_video_without_audio_track_is_refused(tmp_path):
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        for k in range(5):
            vf = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            vf.pts = k
            for p in vs.encode(vf):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    with pytest.raises(AudioInputError, match="no audio track"):
        decode_audio_file(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        decode_audio_file(tmp_path / "nope.wav")
    with pytest.raises(AudioInputError, match="folder"):
        decode_audio_file(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI AUDIO values, sample formats, validation
# ---------------------------------------------------------------------------------------------------------------------


def test_comfy_audio_batch_of_one_is_unwrapped_without_rescaling():
    wave = torch.tensor([[[0.1, -0.2, 1.5, -3.0]], ]).float()  # 1.5 and -3.0: hot / clipped audio is kept as is
    audio = from_comfy_audio({"waveform": wave, "sample_rate": 22050})
    assert audio.sample_rate == 22050 and audio.waveform.shape == (1, 4)
    assert audio.waveform.tolist() == [[pytest.approx(0.1), pytest.approx(-0.2), 1.5, -3.0]]


def test_comfy_audio_accepts_2d_and_1d_and_integral_float_rate():
    assert from_comfy_audio({"waveform": torch.zeros(2, 10), "sample_rate": 8000}).waveform.shape == (2, 10)
    audio = from_comfy_audio({"waveform": torch.zeros(10), "sample_rate": 44100.0})
    assert audio.waveform.shape == (1, 10) and audio.sample_rate == 44100 and isinstance(audio.sample_rate, int)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"waveform": torch.zeros(2, 1, 100), "sample_rate": 16000}, "batch of 2"),
        ({"waveform": torch.zeros(1, 48000, 2), "sample_rate": 48000}, "transpose"),
        ({"waveform": torch.zeros(1, 1, 1, 10), "sample_rate": 16000}, r"\[batch, channels, samples\]"),
        ({"samples": torch.zeros(1, 1, 10), "sample_rate": 16000}, "AUDIO value"),
        (torch.zeros(1, 1, 10), "AUDIO value"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": 0}, "not a valid audio rate"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": 44100.5}, "whole number"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": "fast"}, "number of Hz"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": 480000 * 100}, "swapped"),
    ],
)
def test_comfy_audio_malformed_values_get_clear_errors(value, message):
    with pytest.raises(AudioInputError, match=message):
        from_comfy_audio(value)


@pytest.mark.parametrize("shape", [(1, 2, 0), (1, 0, 100), (0,)])
def test_empty_audio_is_refused(shape):
    with pytest.raises(AudioInputError, match="empty"):
        from_comfy_audio({"waveform": torch.zeros(shape), "sample_rate": 16000})


@pytest.mark.parametrize("bad, label", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite")])
def test_non_finite_samples_are_refused_with_position(bad, label):
    wave = torch.zeros(1, 2, 16000)
    wave[0, 1, 8000] = bad
    with pytest.raises(AudioInputError, match=f"{label}.*0.500 s"):
        from_comfy_audio({"waveform": wave, "sample_rate": 16000})


@pytest.mark.parametrize(
    "samples, expected",
    [
        (torch.tensor([-32768, 16384, 0], dtype=torch.int16), [-1.0, 0.5, 0.0]),
        (torch.tensor([-(2**31), 2**30, 1], dtype=torch.int32), [-1.0, 0.5, 2.0**-31]),
        (torch.tensor([0, 128, 255], dtype=torch.uint8), [-1.0, 0.0, 127 / 128]),
        (np.array([-32768, 8192], dtype=np.int16), [-1.0, 0.25]),
        (np.array([2**30], dtype=np.int32), [0.5]),
        (torch.tensor([0.25, -1.5], dtype=torch.float64), [0.25, -1.5]),
        (torch.tensor([0.25, -1.5], dtype=torch.float16), [0.25, -1.5]),
        (torch.tensor([0.25, -1.5], dtype=torch.bfloat16), [0.25, -1.5]),
    ],
)
def test_sample_formats_scale_to_full_scale_float32(samples, expected):
    out = samples_to_float32(samples)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("samples", [torch.tensor([1, 2], dtype=torch.int64), np.array([True, False]), [0.1, 0.2]])
def test_sample_formats_without_full_scale_are_refused(samples):
    with pytest.raises(AudioInputError):
        samples_to_float32(samples)


def test_int16_comfy_audio_is_scaled():
    audio = from_comfy_audio({"waveform": torch.tensor([[[16384, -16384]]], dtype=torch.int16), "sample_rate": 16000})
    assert audio.waveform.tolist() == [[0.5, -0.5]]


def test_digital_silence_passes_validation_unchanged():
    audio = from_comfy_audio({"waveform": torch.zeros(1, 2, 1600), "sample_rate": 16000})
    assert audio.waveform.abs().sum() == 0 and audio.waveform.shape == (2, 1600)


def test_load_audio_dispatches_on_type(tmp_path):
    x = tone(300, 8000, 0.2)[None]
    path = write_media(tmp_path / "a.wav", x, 8000, "pcm_s16le", "s16")
    from_file = load_audio(path)
    from_str = load_audio(str(path))
    from_dict = load_audio({"waveform": from_file.waveform[None], "sample_rate": 8000})
    passthrough = load_audio(DecodedAudio(from_file.waveform, 8000))
    for a in (from_str, from_dict, passthrough):
        assert a.sample_rate == 8000 and torch.equal(a.waveform, from_file.waveform)
    with pytest.raises(AudioInputError, match="AUDIO value or a file path"):
        load_audio(12345)


# ---------------------------------------------------------------------------------------------------------------------
# Mono
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", range(1, 9))
def test_mono_is_the_mean_of_all_channels(channels):
    wave = torch.randn(channels, 1000, generator=torch.Generator().manual_seed(channels))
    mono = to_mono(wave)
    assert mono.shape == (1000,)
    torch.testing.assert_close(mono, wave.double().mean(0).float(), atol=1e-6, rtol=0)
    if channels > 1:
        assert not torch.allclose(mono, wave[0])  # not the left channel


def test_opposite_channels_cancel_to_silence():
    left = torch.randn(500)
    assert to_mono(torch.stack([left, -left])).abs().max() < 1e-7


# ---------------------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------------------


def test_resampled_length_is_librosas_ceil_rule():
    assert resampled_length(44100, 44100) == 16000
    assert resampled_length(44101, 44100) == 16001  # ceil, not floor or round
    assert resampled_length(1, 8000) == 2
    assert resampled_length(48000 * 3 + 1, 48000) == 48001


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_keeps_in_band_tone_level_and_pitch(sr):
    x = torch.from_numpy(tone(1000, sr, 1.0, 0.5)).float()
    y = resample(x, sr, 16000, backend="soxr")
    assert y.dtype == torch.float32 and y.shape == (resampled_length(len(x), sr),)
    core = y[1600:-1600].numpy()
    assert rms(core) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    assert peak_hz(core, 16000) == pytest.approx(1000, abs=2)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_resampling_is_band_limited(sr):
    # 10 kHz is above the 8 kHz Nyquist limit of 16 kHz audio: a proper resampler removes it; naive
    # decimation or linear interpolation folds it down to 6 kHz at nearly full level.
    x = torch.from_numpy(tone(10000, sr, 1.0, 0.5)).float()
    y = resample(x, sr, 16000, backend="soxr")
    assert rms(y[1600:-1600]) < 0.01 * rms(x)


def test_soxr_backend_is_librosas_soxr_hq():
    x = np.random.default_rng(1).standard_normal(44100).astype(np.float32)
    y = resample(torch.from_numpy(x), 44100, 16000, backend="soxr").numpy()
    reference = soxr.resample(x, 44100, 16000, quality="soxr_hq")  # what librosa.load(sr=16000) calls
    n = resampled_length(len(x), 44100)
    expected = np.pad(reference, (0, max(0, n - len(reference))))[:n]
    np.testing.assert_array_equal(y, expected)


def test_same_rate_is_identity():
    x = torch.randn(1234)
    assert torch.equal(resample(x, 16000, 16000), x)


def _fake_torchaudio(monkeypatch) -> list:
    """Install a torchaudio stand-in whose resample records its calls and returns a deliberately short result."""
    calls = []

    def fake_resample(wave, orig, new):
        calls.append((tuple(wave.shape), orig, new))
        return torch.ones(1, 5)  # deliberately short: the length fix must pad it

    functional = types.ModuleType("torchaudio.functional")
    functional.resample = fake_resample
    package = types.ModuleType("torchaudio")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "torchaudio", package)
    monkeypatch.setitem(sys.modules, "torchaudio.functional", functional)
    return calls


def test_soxr_is_the_default_even_where_torchaudio_imports(monkeypatch):
    # ComfyUI installs usually have torchaudio; the official numbers come from soxr, so it must not take over.
    calls = _fake_torchaudio(monkeypatch)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal(4410).astype(np.float32))
    assert torch.equal(resample(x, 44100, 16000), resample(x, 44100, 16000, backend="soxr"))
    wave, _ = load_mono_16k({"waveform": x[None, None].repeat(1, 2, 1), "sample_rate": 44100})
    assert torch.equal(wave, resample(x, 44100, 16000))
    assert calls == []


def test_torchaudio_only_when_asked(monkeypatch):
    calls = _fake_torchaudio(monkeypatch)
    y = resample(torch.zeros(441), 44100, 16000, backend="torchaudio")
    assert calls == [((1, 441), 44100, 16000)]
    assert y.tolist() == [1.0] * 5 + [0.0] * (160 - 5)
    with pytest.raises(ValueError, match="backend"):
        resample(torch.zeros(441), 44100, 16000, backend="auto")


def test_resample_refuses_multichannel():
    with pytest.raises(AudioInputError, match="mono"):
        resample(torch.zeros(2, 100), 48000)


@pytest.mark.parametrize("sr", [8000, 44100, 48000])
def test_load_mono_16k_matches_manual_steps(tmp_path, sr):
    x = stereo(sr, 0.3)
    path = write_media(tmp_path / f"s{sr}.flac", x, sr, "flac", "s16")
    wave, duration = load_mono_16k(path, backend="soxr")
    decoded = decode_audio_file(path)
    assert duration == pytest.approx(0.3)
    assert torch.equal(wave, resample(decoded.waveform.mean(0), sr, 16000, backend="soxr"))
    assert wave.shape == (resampled_length(x.shape[1], sr),)


def test_module_constants():
    assert audio_io.TARGET_SAMPLE_RATE == 16000


def test_without_soxr_resampling_says_what_to_install_and_16k_needs_none(monkeypatch):
    """soxr has no wheel for Windows on ARM: left out there; a 16 kHz recording needs no resampling at all."""
    from fantasytalking_core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr -> ImportError
    with pytest.raises(MissingDependencyError, match="needs soxr.*pip install soxr.*or give a 16 kHz recording"):
        audio_io.resample(torch.zeros(4410), 44100, 16000)
    wave = torch.linspace(-0.5, 0.5, 1600)
    assert torch.equal(audio_io.resample(wave, 16000, 16000), wave)
