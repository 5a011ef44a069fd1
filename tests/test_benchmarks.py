"""The benchmark scripts still run: bench_gpu.py's tiny configuration on the CPU (issue 18's CI smoke), so a GPU
session spends its minutes measuring, not fixing a script that bit-rotted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SECTIONS = ("dit_pass", "guidance_step_sequential", "guidance_step_batched", "dit_pass_fp8_storage",
            "fast_step_cache_hit", "memory_budget")


def test_bench_gpu_tiny_runs_every_section_it_is_asked_for(tmp_path):
    # its own process: the script arms a watchdog that ends the process past its time budget
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--tiny", "--out", str(out),
                          "--repeats", "1", "--sections", ",".join(SECTIONS)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    sections = json.loads(out.read_text())["sections"]
    for name in SECTIONS:  # a section records its error and the run goes on: each must say ok
        assert sections[name]["status"] == "ok", (name, sections[name])
        assert sections[name]["host_peak_rss_gib"] > 0
    for name in ("dit_pass", "guidance_step_sequential", "dit_pass_fp8_storage"):
        result = sections[name]
        tokens = sections["inputs"]["video_tokens"] * result.get("passes", 1)  # every pass of the timed call
        assert result["median_s"] > 0 and result["finite"]
        assert result["tokens_per_s"] == pytest.approx(tokens / result["median_s"])
    assert sections["guidance_step_sequential"]["passes"] == 3
    assert 0 < sections["fast_step_cache_hit"]["skipped_fraction"] <= 1
    budget_cases = [v for v in sections["memory_budget"].values() if isinstance(v, dict)]
    assert len(budget_cases) == 2 and all(case["status"] == "ok" and case["finite"] for case in budget_cases)


def test_bench_gpu_mid_runs_on_a_cpu(tmp_path):
    # the CPU figures of docs/benchmarks.md at the mid size come from this path
    out = tmp_path / "mid.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--mid", "--out", str(out), "--repeats",
                          "1", "--warmup", "0", "--sections", "dit_pass"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["scale"] == "mid" and data["sections"]["inputs"]["video_tokens"] == 384
    assert data["sections"]["dit_pass"]["status"] == "ok" and data["sections"]["dit_pass"]["finite"]
