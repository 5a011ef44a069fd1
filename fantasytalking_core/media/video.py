"""Write frames and the voice to an mp4 (H.264 + AAC) with PyAV.

The file is written beside the target under a temporary name and renamed when complete, so a failed or
interrupted write never leaves a partial video and never damages an existing one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..audio.io import resample
from ..errors import OutputWriteError, SettingsError

AAC_MAX_SAMPLE_RATE = 48000
"""Highest rate the sound is muxed at, in Hz: FFmpeg's AAC encoder refuses 176.4/192 kHz, and nothing above
48 kHz is audible in a voice track."""
AAC_SAMPLE_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""The rates (Hz, up to :data:`AAC_MAX_SAMPLE_RATE`) FFmpeg's AAC encoder opens with."""


PARTIAL_NAME_EXTRA = len(".") + len(".12345678.partial")
"""Bytes the temporary name (``.<stem>.<8 hex>.partial<suffix>``) adds to the output's file name."""
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")
"""File name endings whose containers take H.264 video with AAC sound (FFmpeg picks the container by the name)."""


def check_output_path(path: str | Path) -> Path:
    """``path`` as a Path when :func:`write_video` can write there, else a SettingsError naming the fix; cheap,
    so that callers check it before any model loads instead of failing after the whole run."""
    path = Path(path)
    if path.is_dir():
        raise SettingsError(f"The output {path} is a folder: give a file name in it, e.g. {path / 'talking.mp4'}.")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise SettingsError(f"The output {path.name} is not a video file name: end it with "
                            f"{' or '.join(VIDEO_SUFFIXES[:2])} (e.g. {path.with_suffix('.mp4').name}).")
    folder = next(p for p in path.parents if p.exists())  # the first part of the path that exists
    if not folder.is_dir():
        raise SettingsError(f"The output {path} cannot be created: {folder} is a file, not a folder.")
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not every file system or platform says
        longest = 255
    # the name's length as the file system counts it: UTF-16 units on Windows, bytes elsewhere
    windows = os.name == "nt"
    length = len(path.name.encode("utf-16-le")) // 2 if windows else len(os.fsencode(path.name))
    if length + PARTIAL_NAME_EXTRA > longest:
        unit = "characters" if windows else "bytes"
        raise SettingsError(f"The output file name is {length} {unit} long; shorten it to at most "
                            f"{longest - PARTIAL_NAME_EXTRA} (the file system's limit, less the temporary name's).")
    try:  # a file created and removed at once: the folder takes new files (permissions, read-only mounts)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputWriteError(f"The output {path} cannot be written: {folder} does not take new files "
                               f"({exc.strerror or exc}); choose another folder.") from None
    return path


def aac_sample_rate(sample_rate: int) -> int:
    """The rate (Hz) a ``sample_rate`` recording is muxed at: itself when AAC takes it, else the next AAC rate up,
    capped at 48 kHz (so 176.4 and 192 kHz become 48 kHz, and an odd 37 kHz becomes 44.1 kHz)."""
    return next((rate for rate in AAC_SAMPLE_RATES if rate >= sample_rate), AAC_MAX_SAMPLE_RATE)


DEFAULT_CRF = 18
"""H.264 quality (constant rate factor) of the videos written: looks lossless for most content."""
MAX_CRF = 51  # x264's scale: 0 is lossless (in yuv420p), 51 the smallest file


def check_crf(crf: int) -> int:
    """``crf`` when it is a whole number on x264's 0..51 scale, else a SettingsError saying the scale."""
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= MAX_CRF:
        raise SettingsError(f"crf must be a whole number from 0 (lossless) to {MAX_CRF} (smallest file), got {crf}; "
                            f"{DEFAULT_CRF} looks lossless for most content.")
    return crf


def write_video(
    path: str | Path,
    frames: torch.Tensor,
    fps: float,
    audio: torch.Tensor | None = None,
    sample_rate: int | None = None,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode ``frames`` as H.264 (yuv420p) and mux ``audio`` as AAC, fitted to the video's duration (trimmed, or
    padded with silence: the frame rule may make the video up to ~4 frames longer than the recording).

    Args:
        frames: [F, H, W, 3] float in 0..1 (ComfyUI IMAGE layout); H and W are padded to even sizes for yuv420p.
        fps: frames per second.
        audio: [C, T] or [T] float waveform in -1..1, or None for a silent video.
        sample_rate: audio sample rate in Hz (needed with ``audio``); a rate AAC does not take is resampled to
            :func:`aac_sample_rate`.
        crf: H.264 quality, 0 (lossless; not every player plays such files) .. 51; lower is better, the default
            18 looks lossless for most content.
    Returns:
        The written path; it only appears (or is replaced) once the whole file is written.
    """
    with VideoStreamWriter(path, fps, audio, sample_rate, crf) as writer:
        writer.write(frames)
    return writer.path


DEFAULT_LAYOUTS = {3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
"""FFmpeg's default channel layout for a channel count (``av_channel_layout_default``): how a file that does not name
its layout is read."""


def downmix_to_stereo(wave: torch.Tensor, sample_rate: int, chunk_s: float = 10.0) -> torch.Tensor:
    """[C, T] float audio of more than two channels -> [2, T], mixed as FFmpeg mixes :data:`DEFAULT_LAYOUTS` (5.1:
    front left, right, centre, LFE, back left, right; the centre and surrounds go into both sides, the LFE is
    dropped), through PyAV's resampler, ``chunk_s`` seconds at a time."""
    import av

    layout = DEFAULT_LAYOUTS.get(wave.shape[0])
    if layout is None:  # no usual layout has this many channels: every one in both sides
        return wave.mean(dim=0, keepdim=True).expand(2, -1).clone()
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate)
    step = max(1, int(chunk_s * sample_rate))
    parts = []
    for start in range(0, wave.shape[1], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + step].numpy()), format="fltp",
                                           layout=layout)
        frame.sample_rate = sample_rate
        parts += [torch.from_numpy(out.to_ndarray()) for out in resampler.resample(frame)]
    parts += [torch.from_numpy(out.to_ndarray()) for out in resampler.resample(None)]  # what it still holds
    return torch.cat(parts, dim=1)[:, :wave.shape[1]]


def _mux_audio(container, stream, audio: torch.Tensor, sample_rate: int, duration_s: float) -> None:
    """Encode ``audio`` ([C, T] or [T] at ``sample_rate`` Hz) into ``stream`` at the stream's rate, trimmed or
    padded with silence to ``duration_s`` seconds."""
    import av  # deferred (as in audio/io.py): sampling never needs the FFmpeg bindings

    wave = audio.detach().float().cpu()
    wave = wave.unsqueeze(0) if wave.ndim == 1 else wave
    if wave.shape[0] > 2:  # 5.1 and the like: mixed down, not cut to the first two (the dialogue is in the centre)
        wave = downmix_to_stereo(wave, sample_rate)
    if stream.rate != sample_rate:  # a rate AAC refuses (e.g. 192 kHz): the library's resampler, channel by channel
        wave = torch.stack([resample(channel, sample_rate, stream.rate) for channel in wave])
        sample_rate = stream.rate
    length = int(round(duration_s * sample_rate))
    wave = torch.nn.functional.pad(wave[:, :length], (0, max(0, length - wave.shape[1]))).clamp(-1, 1).numpy()
    channels = wave.shape[0]
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, wave.shape[1], frame_size):
        chunk = np.ascontiguousarray(wave[:, start:start + frame_size], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = sample_rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


class VideoStreamWriter:
    """Write an mp4 (H.264 + AAC) chunk by chunk, for videos too long to hold in memory.

    Frames go to a hidden temporary file next to ``path`` (same folder, so the final rename is atomic) that is
    renamed to ``path`` by :meth:`close`; :meth:`abort`, or an exception inside ``with``, deletes it, so a failed
    or interrupted run leaves no partial video. The audio is muxed at :meth:`close`, fitted to the frames written
    (as :func:`write_video` does).

    Args:
        path: the output file.
        fps: frames per second.
        audio: [C, T] or [T] float waveform in -1..1 (the whole recording), or None for a silent video.
        sample_rate: audio sample rate in Hz (needed with ``audio``); a rate AAC does not take is resampled to
            :func:`aac_sample_rate`.
        crf: H.264 quality (see :func:`write_video`).
    """

    def __init__(self, path: str | Path, fps: float, audio: torch.Tensor | None = None,
                 sample_rate: int | None = None, crf: int = DEFAULT_CRF):
        if audio is not None and not sample_rate:
            raise ValueError("audio needs its sample_rate.")
        check_crf(crf)
        self.path = check_output_path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.audio, self.sample_rate, self.crf = audio, sample_rate, crf
        self.frames_written = 0
        # same suffix as the target, so the container format is chosen from the name exactly as it would be
        self.temp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial{self.path.suffix}")
        self._container = self._video = self._sound = None
        self._size: tuple[int, int] | None = None  # (height, width), padded to even

    def _open(self, height: int, width: int) -> None:
        import av

        self._size = (height + height % 2, width + width % 2)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.temp), mode="w")
        except OSError as exc:  # PyAV's errors are OSErrors too
            raise OutputWriteError(f"The output {self.path} cannot be written ({exc.strerror or exc}).") from None
        self._video = self._container.add_stream("libx264", rate=self.rate)
        self._video.height, self._video.width = self._size
        self._video.pix_fmt, self._video.options = "yuv420p", {"crf": str(self.crf)}
        if self.audio is not None:  # every stream must exist before the first packet
            self._sound = self._container.add_stream("aac", rate=aac_sample_rate(int(self.sample_rate)))
            mono = self.audio.ndim == 1 or self.audio.shape[0] == 1
            self._sound.layout = "mono" if mono else "stereo"

    def write(self, frames: torch.Tensor) -> None:
        """Encode frames [f, H, W, 3] float in 0..1 (every chunk the same H, W)."""
        import av

        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}.")
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        height, width = self._size
        if (frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2) != self._size:
            raise ValueError(f"frames are {tuple(frames.shape[1:3])}, the video is {self._size}.")
        pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for frame in pixels:
            if frame.shape[:2] != (height, width):
                frame = np.pad(frame, ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0)), mode="edge")
            try:
                self._container.mux(self._video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            except OSError as exc:  # no space left on the disk, typically
                raise OutputWriteError(f"The video {self.path} could not be written ({exc.strerror or exc}).") from None
        self.frames_written += len(pixels)

    def close(self) -> Path:
        """Flush the video, mux the audio, and move the file to ``path``."""
        if self._container is None:
            raise ValueError("no frames were written.")
        try:
            self._container.mux(self._video.encode())
            if self._sound is not None:
                _mux_audio(self._container, self._sound, self.audio, int(self.sample_rate),
                           self.frames_written / float(self.rate))
            self._container.close()
            self._container = None
            os.replace(self.temp, self.path)  # atomic on one file system: readers see the old file or the whole new one
        except OSError as exc:  # no space left, the folder gone or made read-only meanwhile
            self.abort()
            raise OutputWriteError(f"The video {self.path} could not be written ({exc.strerror or exc}).") from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial file (also on Ctrl-C, through ``__exit__``)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # closing a half-written container may fail; the file goes anyway
                pass
            self._container = None
        try:
            self.temp.unlink(missing_ok=True)
        except OSError:  # never made (e.g. its folder could not be), so nothing is left behind either
            pass

    def __enter__(self) -> "VideoStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
