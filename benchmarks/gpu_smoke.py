"""The engine's GPU-only code paths, end to end on the tiny fixture model: a check, not a benchmark.

Each row samples the official fixture's inputs (``tests/fixtures/official``) for a few steps through the library's
own entry points (``pipeline.sample_latents`` inside ``runtime.placement.dit_on_device``), on CUDA in bf16, with
one option set, and reports whether the result is finite and its relative RMS difference from the plain bf16 run:

  plain, --compile (inductor + Triton), fp8 weights, --fp8-matmul (torch._scaled_mm with row-wise scales; the
  fixture's 45 tokens per pass exercise the row padding), both, a kijai-format LoRA, the step cache (with
  compile), streamed placement (block offloading on a side stream) with all of the above; then the sampler node's
  worker pool with one worker on this GPU (NCCL, world size 1: ``runtime/pool.py``), its DiT kept on the GPU,
  then kept on the CPU and streamed per clip, and a memory budget every worker refuses in one line. Each fused
  attention library of ``--attention`` that runs here (xformers, flash-attn, sageattention) adds two rows: alone
  and with ``--compile``; the refusal of each one that does not is reported.

The fp8 file is the fixture DiT quantized per tensor (as ComfyUI's fp8-scaled files); the LoRA is random. On a CPU
the script runs too (no fp8 matmuls, no streams: the same rows, as a smoke test).

    PYTHONPATH=. python3 benchmarks/gpu_smoke.py --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fantasytalking_core.errors import SettingsError  # noqa: E402
from fantasytalking_core.loaders.adapter import load_audio_adapter  # noqa: E402
from fantasytalking_core.loaders.lora import read_wan_lora  # noqa: E402
from fantasytalking_core.loaders.state_dict import open_checkpoint  # noqa: E402
from fantasytalking_core.loaders.wan_dit import load_wan_dit  # noqa: E402
from fantasytalking_core.parity import rel_rms  # noqa: E402
from fantasytalking_core.pipeline import GenerationSettings, sample_latents  # noqa: E402
from fantasytalking_core.runtime.attention import ATTENTION_BACKENDS, check_attention  # noqa: E402
from fantasytalking_core.runtime.placement import dit_on_device  # noqa: E402
from model_files import OFFICIAL, save_wan_file, to_fp8_scaled  # noqa: E402
from test_loaders_lora import kijai_lora  # noqa: E402

STEPS = 6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = load_file(OFFICIAL / "inputs.safetensors")
    config, adapter = OFFICIAL / "dit" / "config.json", OFFICIAL / "dit" / "fantasytalking.ckpt"
    scratch = Path(tempfile.mkdtemp())
    fp8_file = save_wan_file(to_fp8_scaled(dict(open_checkpoint(OFFICIAL / "dit" / "dit.safetensors").items())),
                             scratch / "fp8_scaled.safetensors")
    lora = read_wan_lora(kijai_lora(scratch / "lora.safetensors")[0], 1.0)
    bf16 = load_audio_adapter(adapter, load_wan_dit(OFFICIAL / "dit" / "dit.safetensors", config=config,
                                                    dtype=torch.bfloat16))
    fp8 = load_audio_adapter(adapter, load_wan_dit(fp8_file, config=config, fp8_storage=True,
                                                   compute_dtype=torch.bfloat16, dtype=torch.bfloat16))
    rows = [  # name, model, settings, placement
        ("plain", bf16, {}, "resident"),
        ("compile", bf16, {"compile": True}, "resident"),
        ("fp8 weights", fp8, {}, "resident"),
        ("fp8 matmul", fp8, {"fp8_matmul": True}, "resident"),
        ("fp8 matmul + compile", fp8, {"fp8_matmul": True, "compile": True}, "resident"),
        ("LoRA", bf16.with_loras([lora]), {}, "resident"),
        ("step cache 0.5 + compile", bf16, {"step_cache": 0.5, "compile": True}, "resident"),
        ("streamed", bf16, {}, "streamed"),
        ("streamed + fp8 matmul + compile + LoRA + cache", fp8.with_loras([lora]),
         {"fp8_matmul": True, "compile": True, "step_cache": 0.5}, "streamed"),
    ]
    usable, refused = installed_attention(device)
    for name in usable:  # the --attention libraries that run here, on their own and compiled
        rows += [(f"attention {name}", bf16, {"attention": name}, "resident"),
                 (f"attention {name} + compile", bf16, {"attention": name, "compile": True}, "resident")]
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "steps": STEPS, "attention_refused": refused, "rows": {}}
    for name, message in refused.items():
        print(f"attention {name}: refused: {message}", flush=True)
    reference = None
    ok = True
    for name, model, options, placement in rows:
        settings = GenerationSettings(steps=STEPS, cfg=4.5, audio_cfg=3.0, **options)
        start = time.perf_counter()
        try:
            with dit_on_device(model, device, placement):
                out = sample_latents(model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"],
                                     x["audio_features"][0], 17, settings).float().cpu()
            row = {"finite": bool(torch.isfinite(out).all()), "seconds": time.perf_counter() - start}
            reference = out if reference is None else reference
            row["rel_rms_vs_plain"] = rel_rms(out, reference)
            row["lora_layers_left"] = sum("lora" in k for k in model.transformer.state_dict())
            ok &= row["finite"] and row["lora_layers_left"] == 0
        except Exception as exc:  # noqa: BLE001 - every row is reported
            row = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            ok = False
        report["rows"][name] = row
        print(f"{name:50s} {json.dumps(row)}", flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    ok &= pool_rows(device, x, reference, report, args.out)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def installed_attention(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The fused attention libraries of ``--attention`` (not the default, SDPA) that run here, and the refusal of
    each one that does not (not installed, or installed and unable to run its kernels)."""
    usable, refused = [], {}
    for name in ATTENTION_BACKENDS:
        try:
            if name != "sdpa" and check_attention(name, device):
                usable.append(name)
        except SettingsError as exc:
            refused[name] = str(exc)
    return usable, refused


def pool_rows(device: torch.device, x: dict, reference: torch.Tensor, report: dict, out: Path) -> bool:
    """The worker pool's rows (one worker; each clip compared with the plain one-process run); True when all pass."""
    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.loaders.model_source import ModelSource
    from fantasytalking_core.pipeline import sample_latents_in_worker
    from fantasytalking_core.runtime.parallel import ParallelLayout
    from fantasytalking_core.runtime.pool import SamplerPool

    source = ModelSource(str(OFFICIAL / "dit" / "dit.safetensors"), str(OFFICIAL / "dit" / "fantasytalking.ckpt"))
    args = (x["context_pos"], x["context_neg"], x["clip_feature"], x["y"], x["audio_features"][0], 17,
            GenerationSettings(steps=STEPS, cfg=4.5, audio_cfg=3.0))
    ok = True
    for keep in (True, False):
        name = "pool, DiT kept on the GPU" if keep else "pool, DiT on the CPU, streamed per clip"
        start = time.perf_counter()
        try:
            with SamplerPool(ParallelLayout(cfg=1), source.load, device.type, timeout_s=600,
                             keep_on_device=keep) as pool:
                clip = pool.call(sample_latents_in_worker, *args, placement="resident" if keep else "streamed")
                try:
                    pool.call(sample_latents_in_worker, *args, gpu_memory=0.25)
                    refusal = None
                except FantasyTalkingError as exc:
                    refusal = str(exc)
            row = {"finite": bool(torch.isfinite(clip).all()), "seconds": time.perf_counter() - start,
                   "rel_rms_vs_plain": rel_rms(clip.float(), reference), "budget_refusal": refusal}
            ok &= row["finite"] and row["rel_rms_vs_plain"] < 1e-2 and bool(refusal) and "\n" not in refusal
        except Exception as exc:  # noqa: BLE001 - every row is reported
            row = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            ok = False
        report["rows"][name] = row
        print(f"{name:50s} {json.dumps(row)}", flush=True)
        out.write_text(json.dumps(report, indent=1))
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
