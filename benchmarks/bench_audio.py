"""Benchmark of the audio front end: encode speed and peak memory with a wav2vec2-base-size model.

The model has random weights built from the bundled wav2vec2-base-960h config (no download): it is saved once
as a single .safetensors file and every measurement loads it through ``load_wav2vec2``, the real loading path.
Each measurement runs in a fresh Python process so that its peak RSS (``ru_maxrss``) is its own.

What is measured, per recording length (default 1 and 10 minutes):
  * ``extract_audio_features`` on a ComfyUI AUDIO value of 44.1 kHz stereo float32 noise-like audio, uncapped
    (``max_frames=None``, so the whole recording is encoded): decode check, mono, soxr resampling, normalisation,
    chunked wav2vec2. Speed = seconds of audio per wall-clock second.
  * peak RSS of the whole process (Python + torch + model + audio + activations).
And the chunking error: chunked vs one-shot ``Wav2Vec2Model(input_values)`` on a short clip (one window) and on
a clip that is split into several windows.

Usage:  python benchmarks/bench_audio.py [--minutes 1 10] [--accuracy-seconds 10 120]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fantasytalking_core.audio import encode, rules, wav2vec2  # noqa: E402

SR_IN = 44100


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def speechlike(seconds: float, sr: int, channels: int, seed: int = 0) -> torch.Tensor:
    """[C, T] float32 noise with a slowly varying level (non-stationary like speech), ~0.2 RMS."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * sr))
    env = 0.05 + 0.4 * torch.sin(torch.arange(n, dtype=torch.float32) * (2.7 / sr)).abs()
    return env * torch.randn(channels, n, generator=g)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_speed(model_path: str, seconds: float, chunk: float, overlap: float) -> dict:
    model = wav2vec2.load_wav2vec2(model_path)
    rss_model = peak_rss_mb()
    audio = {"waveform": speechlike(seconds, SR_IN, 2)[None], "sample_rate": SR_IN}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    out = encode.extract_audio_features(
        model, audio, max_frames=None, chunk_seconds=chunk, overlap_seconds=overlap, resample_backend="soxr"
    )
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {
        "seconds": seconds,
        "wall_s": wall,
        "cpu_s": cpu,  # robust to other jobs on a shared machine, unlike wall time
        "speed": seconds / wall,
        "tokens": out.num_tokens,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss_model,
        "threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def child_accuracy(model_path: str, seconds: float, chunk: float, overlap: float) -> dict:
    model = wav2vec2.load_wav2vec2(model_path)
    wave = speechlike(seconds, rules.SAMPLE_RATE, 1, seed=1)[0]
    # Chunked first, so that the peak RSS after it is its own; the one-shot reference may only raise it.
    chunked = encode.encode_audio(model, wave, chunk_seconds=chunk, overlap_seconds=overlap)
    rss_chunked = peak_rss_mb()
    one_shot = model(encode.normalize_utterance(wave)[None]).last_hidden_state[0]
    rss_one_shot = peak_rss_mb()
    diff = (chunked - one_shot).abs()
    per_token = diff.max(dim=1).values
    return {
        "seconds": seconds,
        "chunk": chunk,
        "overlap": overlap,
        "windows": len(encode.encoder_windows(one_shot.shape[0], round(chunk * 50), round(overlap * 50))),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_value": float(one_shot.abs().max()),
        "rms_value": float(one_shot.pow(2).mean().sqrt()),
        "tokens_over_1e-4": int((per_token > 1e-4).sum()),
        "tokens": int(one_shot.shape[0]),
        "peak_rss_chunked_mb": rss_chunked,
        "peak_rss_one_shot_mb": rss_one_shot,
    }


def run_child(kind: str, *args: object) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="*", default=[1.0, 10.0])
    parser.add_argument("--accuracy-seconds", type=float, nargs="*", default=[10.0, 120.0])
    parser.add_argument("--chunk-seconds", type=float, default=encode.DEFAULT_CHUNK_SECONDS)
    parser.add_argument("--overlap-seconds", type=float, default=encode.DEFAULT_OVERLAP_SECONDS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, model_path, seconds, chunk, overlap = args.child
        fn = child_speed if kind == "speed" else child_accuracy
        print(json.dumps(fn(model_path, float(seconds), float(chunk), float(overlap))))
        return

    from safetensors.torch import save_file
    from transformers import Wav2Vec2Model

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Wav2Vec2Model(wav2vec2.bundled_wav2vec2_config()).eval()
        model_path = os.path.join(tmp, "wav2vec2-base-960h-random.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
        n_params = sum(p.numel() for p in model.parameters())
        del model

        chunk, overlap = args.chunk_seconds, args.overlap_seconds
        speed = [run_child("speed", model_path, m * 60, chunk, overlap) for m in args.minutes]
        accuracy = [run_child("accuracy", model_path, s, chunk, overlap) for s in args.accuracy_seconds]

    cpu = cpu_name()
    print(f"wav2vec2-base random weights ({n_params / 1e6:.1f} M params, float32), CPU {cpu}, "
          f"{os.cpu_count()} cores visible, torch {torch.__version__}, {speed[0]['threads'] if speed else '?'} threads; "
          f"chunk_seconds={chunk}, overlap_seconds={overlap}\n")
    print("| audio | wall time | audio s / wall s | CPU time | audio s / CPU s | peak RSS | RSS after model load |")
    print("|---|---|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['seconds'] / 60:g} min ({r['tokens']} tokens) | {r['wall_s']:.1f} s | {r['speed']:.2f} | "
              f"{r['cpu_s']:.1f} s | {r['seconds'] / r['cpu_s']:.2f} | "
              f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['rss_after_load_mb'] / 1024:.2f} GB |")
    print()
    print("| clip | windows | max abs diff vs one-shot | mean abs diff | tokens with diff > 1e-4 "
          "| max abs / RMS of features | peak RSS chunked | peak RSS one-shot |")
    print("|---|---|---|---|---|---|---|---|")
    for r in accuracy:
        print(f"| {r['seconds']:g} s | {r['windows']} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | "
              f"{r['tokens_over_1e-4']} / {r['tokens']} | {r['max_abs_value']:.2f} / {r['rms_value']:.2f} | "
              f"{r['peak_rss_chunked_mb'] / 1024:.2f} GB | {r['peak_rss_one_shot_mb'] / 1024:.2f} GB |")


if __name__ == "__main__":
    main()
