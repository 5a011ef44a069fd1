"""What the GPU benchmark scripts share: printing, device memory readings, timing (CUDA events on a GPU), a JSON
report rewritten after every part (a stopped run keeps what it finished) and a watchdog that ends a run stuck in
native code."""

from __future__ import annotations

import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def log(message: str) -> None:
    print(message, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


class Report:
    """All results under ``meta`` and ``group`` (one entry per section or phase), rewritten to ``path`` after every
    record."""

    def __init__(self, path: Path, meta: dict[str, Any], group: str = "sections") -> None:
        self.path = path
        self.group = group
        self.data: dict[str, Any] = {"meta": meta, group: {}}
        self._lock = threading.Lock()

    def record(self, name: str, result: dict[str, Any]) -> None:
        with self._lock:
            self.data[self.group][name] = result
            self._write()

    def note(self, key: str, value: Any) -> None:
        with self._lock:
            self.data["meta"][key] = value
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def start_watchdog(report: Report, current: dict[str, str], after_s: float, part: str = "section"
                   ) -> threading.Timer:
    """End the process ``after_s`` from now even if a ``part`` hangs in native code; the JSON says where."""

    def stop() -> None:
        report.note("watchdog", f"stopped after {after_s:.0f} s in {part} {current.get('name')}")
        log(f"watchdog: budget exceeded in {part} {current.get('name')}; results so far are in {report.path}")
        os._exit(3)

    timer = threading.Timer(after_s, stop)
    timer.daemon = True
    timer.start()
    return timer


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(device seconds, wall seconds, result) of one call; device time from CUDA events where there is CUDA."""
    wall_start = time.perf_counter()
    if device.type != "cuda":
        out = fn()
        elapsed = time.perf_counter() - wall_start
        return elapsed, elapsed, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000, time.perf_counter() - wall_start, out


def all_finite(out: Any) -> bool | None:
    return bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else None


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[dict[str, Any], Any]:
    """Warm up, then time ``repeats`` calls (CUDA events on a GPU); peak memory counts from the first warm-up on.
    Returns the timings and the last call's result."""
    synchronize(device)
    reset_peak(device)
    resident = allocated_gib(device)
    wall_start = time.perf_counter()
    out = None
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    warmup_s = time.perf_counter() - wall_start
    device_s, wall_s = [], []
    for _ in range(repeats):
        seconds, wall, out = timed_call(fn, device)
        device_s.append(seconds)
        wall_s.append(wall)
    return {
        "median_s": statistics.median(device_s),
        "seconds": device_s,
        "wall_seconds": wall_s,
        "warmup_s": warmup_s,
        "resident_gib": resident,
        "peak_gib": peak_gib(device),
        "finite": all_finite(out),
    }, out
