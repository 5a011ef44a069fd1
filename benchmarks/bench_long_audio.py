"""Benchmark of long recordings in segments with the tiny random models: frame count, duration, memory, speed.

Every length runs the command line's path (``long_video.write_long_video``: ``pipeline.stream`` ->
``VideoStreamWriter``) in a fresh Python process, so its peak RSS (``ru_maxrss``) is the whole run's own: imports,
models, the decoded recording, its wav2vec2 features, one segment's frames, the mp4 writer. The models are the
tiny random ones (``tiny.make_tiny_models``), so the numbers measure the segment machinery and the memory that
grows with the recording, not the 14B model's speed.

Input: 16 kHz mono speech-like audio (noise shaped by a ~4 Hz syllable envelope with pauses), a 64x64 portrait.
Checks per length: frames written = the official frame rule on the whole recording; mp4 duration = frames / fps.

Each run uses one torch thread (see ``child``), so the times are one core's.

Usage:  python benchmarks/bench_long_audio.py [--minutes 1 10] [--steps 1] [--image-size 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 16000
FPS = 23


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """int16 [T]: noise under a syllable-rate (~4 Hz) envelope with a pause every few seconds, ~0.1 RMS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    syllables = np.abs(np.sin(2 * np.pi * 2.1 * t)) ** 2
    phrases = (np.sin(2 * np.pi * 0.23 * t) > -0.6).astype(np.float32)  # ~1.3 s pauses every ~4.3 s
    wave_ = 0.3 * syllables * phrases * rng.standard_normal(t.shape[0])
    return (np.clip(wave_, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR), w.writeframes(samples.tobytes())


def prepare(folder: Path, minutes: list[float]) -> None:
    """Write the tiny models, the portrait and one recording per length into ``folder``."""
    from PIL import Image

    from fantasytalking_core.tiny import make_tiny_models

    files = make_tiny_models(folder / "models")
    (folder / "files.json").write_text(json.dumps({k: str(getattr(files, k)) for k in (
        "dit", "adapter", "text_encoder", "tokenizer", "image_encoder", "vae", "wav2vec2")}))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "face.png")
    for m in minutes:
        write_wav(folder / f"voice_{m:g}.wav", speechlike(m * 60))


def child(args: argparse.Namespace) -> None:
    """One run: load the tiny models, generate the recording in segments into an mp4, report as JSON."""
    import av
    import torch

    from fantasytalking_core.audio.rules import frames_for_duration
    from fantasytalking_core.face.workflow import prepare_job
    from fantasytalking_core.loaders.model_paths import ModelFiles, load_models
    from fantasytalking_core.long_video import write_long_video
    from fantasytalking_core.pipeline import FantasyTalkingPipeline, GenerationSettings
    from fantasytalking_core.sampling.segments import SegmentOptions
    from fantasytalking_core.tiny import tiny_model_configs

    # One thread: on a machine shared with other jobs, torch's OpenMP threads spin-wait on each other and the tiny
    # models' many small convolutions ran up to 40x slower with 2 threads than with 1.
    torch.set_num_threads(1)
    files = ModelFiles(**json.loads(Path(args.files).read_text()), configs=tiny_model_configs())
    start = time.perf_counter()
    pipe = FantasyTalkingPipeline(load_models(files, compute_dtype=torch.float32))
    rss_models = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = GenerationSettings(steps=args.steps, image_size=args.image_size, fps=FPS)
    options = SegmentOptions(chaining=args.chaining)
    out = Path(args.out)
    begin = time.perf_counter()
    report = write_long_video(pipe, prepare_job(args.image, settings), args.audio, options, out)
    wall = time.perf_counter() - begin
    with av.open(str(out)) as c:
        video = c.streams.video[0]
        frames = sum(1 for _ in c.demux(video) if _.size)
        duration = float(c.duration / av.time_base)
    minutes = args.minutes[0]
    seconds = minutes * 60
    per = sorted(report.segment_seconds)
    slow = [round(t, 1) for t in report.segment_seconds if t > 4 * per[len(per) // 2]]
    print(json.dumps({"setup_and_close_s": wall - sum(per),
        "minutes": minutes, "frames": frames, "expected_frames": frames_for_duration(seconds, FPS, None),
        "mp4_seconds": duration, "expected_seconds": frames / FPS, "segments": len(report.plan),
        "segment_s_median": per[len(per) // 2], "segment_s_max": per[-1], "segment_s_sum": sum(per),
        "slow_segments": slow, "wall_s": wall,
        "load_s": begin - start, "rss_after_models_mb": rss_models,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--chaining", default="last_frame")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    for name in ("files", "image", "audio", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.prepare:
        prepare(Path(args.prepare), args.minutes)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Everything heavy happens in child processes: Linux carries a parent's peak RSS over into its children's
        # ru_maxrss, so this process stays small (no torch, no audio arrays).
        subprocess.run([sys.executable, __file__, "--prepare", str(tmp), "--minutes", *map(str, args.minutes)],
                       check=True, capture_output=True)
        for minutes in args.minutes:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--minutes", str(minutes), "--steps", str(args.steps),
                 "--image-size", str(args.image_size), "--chaining", args.chaining, "--files", str(tmp / "files.json"),
                 "--image", str(tmp / "face.png"), "--audio", str(tmp / f"voice_{minutes:g}.wav"),
                 "--out", str(tmp / "out.mp4")],
                capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{minutes} min failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"\n{args.steps} step(s), {args.image_size} px, tiny random models, {args.chaining}, 81-frame segments, "
          f"{FPS} fps\n")
    print("| audio | frames (expected) | mp4 s (frames / fps) | segments | s per segment, median (max) | wall s "
          "| RSS after model load MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} min | {r['frames']} ({r['expected_frames']}) | {r['mp4_seconds']:.3f} "
              f"({r['expected_seconds']:.3f}) | {r['segments']} | {r['segment_s_median']:.3f} ({r['segment_s_max']:.3f}) "
              f"| {r['wall_s']:.1f} | {r['rss_after_models_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    if len(rows) > 1:
        print(f"\npeak RSS {rows[-1]['minutes']:g} min / {rows[0]['minutes']:g} min: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
