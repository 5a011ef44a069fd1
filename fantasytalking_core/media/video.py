"""Write frames and the voice to an mp4 (H.264 + AAC) with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def write_video(
    path: str | Path,
    frames: torch.Tensor,
    fps: float,
    audio: torch.Tensor | None = None,
    sample_rate: int | None = None,
    crf: int = 18,
) -> Path:
    """Encode ``frames`` as H.264 (yuv420p) and mux ``audio`` as AAC, fitted to the video's duration (trimmed, or
    padded with silence: the frame rule may make the video up to ~4 frames longer than the recording).

    Args:
        frames: [F, H, W, 3] float in 0..1 (ComfyUI IMAGE layout); H and W are padded to even sizes for yuv420p.
        fps: frames per second.
        audio: [C, T] or [T] float waveform in -1..1, or None for a silent video.
        sample_rate: audio sample rate in Hz (needed with ``audio``).
        crf: H.264 quality (lower is better; 18 is visually lossless for most content).
    Returns:
        The written path.
    """
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}.")
    if audio is not None and not sample_rate:
        raise ValueError("audio needs its sample_rate.")
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    height, width = pixels.shape[1] + pixels.shape[1] % 2, pixels.shape[2] + pixels.shape[2] % 2
    rate = Fraction(fps).limit_denominator(1001)

    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf)}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=int(sample_rate))
            sound.layout = "mono" if audio.ndim == 1 or audio.shape[0] == 1 else "stereo"
        for frame in pixels:
            if frame.shape[:2] != (height, width):
                frame = np.pad(frame, ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0)), mode="edge")
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            _mux_audio(container, sound, audio, int(sample_rate), len(pixels) / float(rate))
    return path


def _mux_audio(container, stream, audio: torch.Tensor, sample_rate: int, duration_s: float) -> None:
    wave = audio.detach().float().cpu()
    wave = wave.unsqueeze(0) if wave.ndim == 1 else wave[:2]
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
