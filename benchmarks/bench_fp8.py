"""Accuracy of fp8 weights and fp8 matmuls against float32, per guidance pass, on the tiny and the mid model.

Models (both random-weight sets with the official float32 passes, see their READMEs):

  * tiny: ``tests/fixtures/official`` (the float32 parity set; reference: our float32 passes, equal to the official
    ones within 1e-4),
  * mid: ``tests/fixtures/official_bf16`` (heads of 128 like the 14B model, a non-square 16x24 latent; reference:
    its stored official float32 passes).

Rows, each computed from the set's weights under the official precision policy:

  * bf16: weights and compute in bf16 (the default run),
  * fp8 storage: block Linear weights quantized to e4m3 with one scale per tensor (what an fp8-scaled file holds),
    upcast to bf16 per call (``--fp8``),
  * fp8 matmul row-wise / per-tensor: the same weights through ``torch._scaled_mm`` with activations quantized per
    token row (Hopper and newer) or per tensor (compute capability 8.9) (``--fp8-matmul``). On a CPU torch's
    ``_scaled_mm`` computes the same quantized products (the layers are switched to it directly; a run on a CPU
    never does that), so the figures measure the arithmetic, not a GPU kernel's accumulation order.

Values: relative RMS error against float32 for the passes u (negative prompt), p (positive), pa (positive +
audio), the guided velocity and the audio term pa - p.

Usage:  python benchmarks/bench_fp8.py [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import enable_fp8_storage, fp8_weight_names, store_linears_fp8_  # noqa: E402
from fantasytalking_core.loaders.wan_dit import FP8Linear  # noqa: E402
from fantasytalking_core.parity import (load_fixture_model, load_precision_set_model,  # noqa: E402
                                        precision_set_passes, reference_passes, rel_rms)
from fantasytalking_core.runtime.fp8 import SCALED, UPCAST  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PASSES = {"u": {"context": "context_neg", "audio_scale": 0.0}, "p": {"context": "context_pos", "audio_scale": 0.0},
          "pa": {"context": "context_pos", "audio_scale": 1.0}}
NAMES = ("u", "p", "pa", "guided", "audio_term")


def tiny_set() -> tuple:
    """(bf16 model loader, inputs, stats, float32 reference passes) of the tiny parity set."""
    root = FIXTURES / "official"
    sampling = json.loads((root / "sampling.json").read_text())
    stats = {"passes": PASSES, "num_frames": sampling["num_frames"], "cfg": sampling["cfg_scale"],
             "audio_cfg": sampling["audio_cfg_scale"]}
    inputs = load_file(root / "inputs.safetensors")
    reference = precision_set_passes(load_fixture_model(root, "dit.safetensors", "fantasytalking.ckpt"), inputs, stats)
    return lambda: load_fixture_model(root, "dit.safetensors", "fantasytalking.ckpt", torch.bfloat16), inputs, \
        stats, reference


def mid_set() -> tuple:
    root = FIXTURES / "official_bf16"
    stats = json.loads((root / "stats.json").read_text())
    return (lambda: load_precision_set_model(root, torch.bfloat16), load_file(root / "inputs.safetensors"), stats,
            reference_passes(load_file(root / "outputs.safetensors")))


def rows_for(load, inputs: dict, stats: dict, reference: dict) -> dict[str, dict[str, float]]:
    def errors(model) -> dict[str, float]:
        ours = precision_set_passes(model, inputs, stats)
        return {name: rel_rms(ours[name], reference[name]) for name in NAMES}

    model = load()
    table = {"bf16": errors(model)}
    transformer = model.transformer
    enable_fp8_storage(transformer, store_linears_fp8_(transformer, fp8_weight_names(transformer)))
    layers = [m for m in transformer.modules() if isinstance(m, FP8Linear)]
    table[f"fp8 storage ({len(layers)} layers)"] = errors(model)
    for label, rowwise in (("fp8 matmul row-wise", True), ("fp8 matmul per-tensor", False)):
        for layer in layers:
            layer.matmul, layer.rowwise = SCALED, rowwise
        table[label] = errors(model)
    for layer in layers:
        layer.matmul = UPCAST
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the tables as one JSON object")
    args = parser.parse_args()
    tables = {name: rows_for(*make()) for name, make in (("tiny", tiny_set), ("mid", mid_set))}
    if args.json:
        print(json.dumps(tables))
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for name, table in tables.items():
        print(f"\n{name}: relative RMS error against float32")
        print("| row | " + " | ".join(NAMES) + " |")
        print("|---|" + "---|" * len(NAMES))
        for row, values in table.items():
            print(f"| {row} | " + " | ".join(f"{values[n]:.2e}" for n in NAMES) + " |")


if __name__ == "__main__":
    main()
