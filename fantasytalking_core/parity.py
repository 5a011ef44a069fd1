"""Recompute a golden fixture set of the official implementation with this package and compare.

Two layouts are recognised by their files:

- a *parity set*, laid out like ``tests/fixtures/official`` (its README documents every file): the DiT and
  adapter in their real file formats under ``dit/``, ``inputs.*``, ``dit_outputs.safetensors``,
  ``sampling.{json,safetensors}`` and ``windows.json``, and optionally the ``vae/``, ``clip/`` and ``t5/`` sets.
  Float outputs pass within ``1e-4 * max|reference|``; integer outputs must be equal. An item whose files the set
  lacks fails, with a note naming them (an optional ``vae/``, ``clip/`` or ``t5/`` folder that is absent is not
  part of the set; one that is there must be complete).
- a *precision set*, laid out like ``tests/fixtures/official_bf16``: ``dit/`` (bf16 DiT + adapter),
  ``inputs.safetensors``, ``outputs.safetensors`` with the official float32 passes ``fp32_*`` and
  ``stats.json`` with the official bf16 run's relative RMS error against them. Our float32 passes must equal
  ``fp32_*`` within ``1e-4 * max|reference|`` (items ``fp32/*``); our bf16 passes may lose at most
  :data:`BF16_RATIO_LIMIT` times the official bf16 error against ``fp32_*`` (items ``bf16/*``: ``rel_error`` is
  the relative RMS error, ``tolerance`` its limit, ``ratio`` ours / official).

Everything is loaded through the package's own loaders and recomputed; each comparison becomes one
:class:`ParityResult`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .model.adapter import AudioConditioning
from .audio.windows import AudioWindows, audio_windows_for_frames, gather_audio_windows
from .errors import ModelNotFoundError
from .sampling.guidance import NEG, POS, POS_AUDIO, GuidanceConfig, combine_guidance
from .loaders.adapter import load_audio_adapter
from .loaders.wan_dit import load_wan_dit
from .sampling.euler import DiTConditions, guided_velocity, initial_noise, sample_flow_euler
from .sampling.schedule import flow_match_sigmas
from .model.transformer import FantasyTalkingModel

REL_TOL = 1e-4
PASS_NAMES = {NEG: "pred_neg_noaudio", POS: "pred_pos_noaudio", POS_AUDIO: "pred_pos_audio"}
BF16_STATS_KEY = "official_bf16_rel_rms_vs_fp32"  # marks a precision set's stats.json
BF16_RATIO_LIMIT = 1.2  # our bf16 error / the official bf16 error, both against float32 (README of the set)
BF16_PASSES = {"u": NEG, "p": POS, "pa": POS_AUDIO}  # a precision set's pass names -> guidance passes


@dataclass
class ParityResult:
    """One comparison. ``rel_error`` is checked against ``tolerance`` for ratio items (``ratio`` set), else
    ``max_abs_error`` is; ``ratio`` (ours / official bf16 error) is written only where it applies."""

    name: str
    max_abs_error: float
    rel_error: float
    tolerance: float
    passed: bool
    note: str = ""  # why an item failed without a comparison (e.g. "missing sampling.json")
    ratio: float | None = None  # ours / official bf16 error, for the precision set's bf16 items

    def to_json(self) -> str:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        if not d["note"]:
            del d["note"]
        if d["ratio"] is None:
            del d["ratio"]
        return json.dumps(d)


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL) -> ParityResult:
    """Float comparison: pass when max|ours - ref| <= rel_tol * max|ref| (shapes must agree)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return ParityResult(name, float("inf"), float("inf"), 0.0, False)
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    rel = err / scale if scale else err
    tol = rel_tol * scale
    return ParityResult(name, err, rel, tol, bool(err <= tol))


def rel_rms(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error sqrt(mean((ours - ref)^2)) / sqrt(mean(ref^2)), in float64."""
    diff, ref = ours.double() - ref.double(), ref.double()
    return (diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def compare_error_ratio(name: str, ours: torch.Tensor, ref: torch.Tensor, official: float,
                        limit: float = BF16_RATIO_LIMIT) -> ParityResult:
    """Reduced-precision comparison: pass when rel_rms(ours, ref) <= limit * official, where ``official`` is the
    official reduced-precision run's relative RMS error against the same float32 reference ``ref``."""
    if tuple(ours.shape) != tuple(ref.shape):
        return ParityResult(name, float("inf"), float("inf"), 0.0, False)
    rel = rel_rms(ours, ref)
    err = (ours.double() - ref.double()).abs().max().item()
    ratio = rel / official if official > 0 else float("inf")
    return ParityResult(name, err, rel, limit * official, bool(rel <= limit * official), ratio=ratio)


def missing(name: str, note: str = "missing from the set") -> ParityResult:
    """An item the layout requires but the set does not hold: a failure, never a silent skip."""
    return ParityResult(name, float("inf"), float("inf"), 0.0, False, note)


def absent_files(root: Path, *files: str) -> str:
    """"" when every one of ``files`` (relative to ``root``) exists, else "missing a, b" naming the absent ones."""
    gone = [f for f in files if not (root / f).is_file()]
    return f"missing {', '.join(gone)}" if gone else ""


def compare_exact(name: str, ours: object, ref: object) -> ParityResult:
    """Integer comparison: equal or fail. The error is the largest absolute difference (inf on shape mismatch)."""
    a, b = torch.as_tensor(ours), torch.as_tensor(ref)
    if a.shape != b.shape:
        return ParityResult(name, float("inf"), float("inf"), 0.0, False)
    err = float((a.long() - b.long()).abs().max().item()) if a.numel() else 0.0
    return ParityResult(name, err, err, 0.0, err == 0)


def _read_json(path: Path) -> Any:
    """A fixture set's JSON file, read as UTF-8 whatever the system's default encoding."""
    return json.loads(path.read_text(encoding="utf-8"))


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise ModelNotFoundError(f"None of {', '.join(names)} found in {folder}.")


def load_fixture_model(root: Path, dit_file: str, adapter_file: str,
                       dtype: torch.dtype = torch.float32) -> FantasyTalkingModel:
    """The DiT + adapter of a fixture set, loaded through the package's loaders to compute in ``dtype``."""
    dit = load_wan_dit(root / "dit" / dit_file, config=root / "dit" / "config.json", dtype=dtype)
    return load_audio_adapter(root / "dit" / adapter_file, dit, dtype=dtype)


def check_windows(root: Path) -> Iterator[ParityResult]:
    """Every case of windows.json: ranges, expanded ranges, k_lens and slot indices, exactly."""
    if note := absent_files(root, "windows.json"):
        yield missing("windows", note)
        return
    cases = _read_json(root / "windows.json")["cases"]
    for i, case in enumerate(cases):
        w = audio_windows_for_frames(case["audio_tokens"], case["num_frames"])
        name = f"windows/{i}:N{case['num_frames']}_L{case['audio_tokens']}_{case['case']}"
        fields = [(w.pos_idx_ranges, case["pos_idx_ranges"]), (w.expanded_ranges, case["expanded_ranges"]),
                  (w.k_lens, case["k_lens"]), (w.token_indices, case["window_token_indices"]),
                  ((w.half_tokens, w.window_len), (case["half_tokens"], case["window_len"]))]
        results = [compare_exact(name, ours, ref) for ours, ref in fields]
        yield max(results, key=lambda r: r.max_abs_error)


def check_frame_rule(root: Path) -> Iterator[ParityResult]:
    """The official frame-count rule and the wav2vec2 crop/length rules of windows.json, exactly."""
    from .audio.rules import crop_samples_for_frames, frames_for_duration, wav2vec2_num_tokens

    if note := absent_files(root, "windows.json"):
        yield missing("frame_rule", note)
        return
    table = _read_json(root / "windows.json")
    rule = table.get("frame_rule", {}).get("results", [])
    if not rule:
        yield missing("frame_rule", "windows.json has no frame_rule.results")
    else:
        ours = [frames_for_duration(r["duration_s"], r["fps"], r["max_num_frames"]) for r in rule]
        yield compare_exact("frame_rule", ours, [r["num_frames"] for r in rule])
    cases = [c for c in table["cases"] if c.get("audio_samples_16k") is not None]  # token-only cases have none
    crops = [min(c["audio_samples_16k"], crop_samples_for_frames(c["num_frames"], table.get("fps", 23))) for c in cases]
    yield compare_exact("wav2vec2/crop_samples", crops, [c["wav2vec_input_samples"] for c in cases])
    yield compare_exact("wav2vec2/num_tokens", [wav2vec2_num_tokens(c["wav2vec_input_samples"]) for c in cases],
                        [c["audio_tokens"] for c in cases])


def check_loaders(root: Path, model: FantasyTalkingModel) -> Iterator[ParityResult]:
    """The other file layouts of the same weights must load to identical tensors."""
    reference = model.state_dict()
    dit_dir = root / "dit"
    for dit_file, adapter_file in (("dit_comfy.safetensors", "fantasytalking.safetensors"),):
        if note := absent_files(dit_dir, dit_file, adapter_file):
            yield missing(f"load/{dit_file}+{adapter_file}", note)
            continue
        other = load_fixture_model(root, dit_file, adapter_file).state_dict()
        if set(other) != set(reference):
            yield ParityResult(f"load/{dit_file}+{adapter_file}", float("inf"), float("inf"), 0.0, False)
            continue
        err = max((other[k].double() - reference[k].double()).abs().max().item() for k in reference)
        yield ParityResult(f"load/{dit_file}+{adapter_file}", err, err, 0.0, err == 0)


def check_dit(root: Path, model: FantasyTalkingModel, inputs: dict, windows: AudioWindows) -> Iterator[ParityResult]:
    """Audio projection, windows and every stored DiT forward."""
    if note := absent_files(root, "dit_outputs.safetensors"):
        yield missing("dit", note)
        return
    path = root / "dit_outputs.safetensors"
    outputs = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        custom_scale = (f.metadata() or {}).get("custom_audio_scale")
    with torch.no_grad():
        proj_full = model.project_audio(inputs["audio_features"])
    proj = gather_audio_windows(proj_full, windows)
    yield compare_exact("dit/pos_idx_ranges", windows.pos_idx_ranges, outputs["pos_idx_ranges"])
    yield compare_exact("dit/expanded_ranges", windows.expanded_ranges, outputs["expanded_ranges"])
    yield compare_exact("dit/audio_context_lens", windows.k_lens, outputs["audio_context_lens"])
    yield compare("dit/audio_proj_full", proj_full, outputs["audio_proj_full"])
    yield compare("dit/audio_proj", proj, outputs["audio_proj"])

    k_lens = windows.k_lens_tensor()
    cases = {
        "pred_audio0": ("context_pos", 0.0, k_lens),
        "pred_audio1_masked": ("context_pos", 1.0, k_lens),
        "pred_audio1_unmasked": ("context_pos", 1.0, None),
        "pred_audio_custom_masked": ("context_pos", None if custom_scale is None else float(custom_scale), k_lens),
        "pred_neg_audio0": ("context_neg", 0.0, k_lens),
    }
    for name, (context, scale, lens) in cases.items():
        if name not in outputs or scale is None:  # scale None: the metadata lacks custom_audio_scale
            yield missing(f"dit/{name}")
            continue
        with torch.no_grad():
            pred = model(inputs["x"], inputs["timestep"], inputs[context], inputs["clip_feature"], inputs["y"],
                         AudioConditioning(proj, lens, scale))
        yield compare(f"dit/{name}", pred, outputs[name])


def check_sampling(root: Path, model: FantasyTalkingModel, inputs: dict, windows: AudioWindows) -> Iterator[ParityResult]:
    """The whole denoising run: schedule, noise, every pass of every step, and the final latent."""
    if note := absent_files(root, "sampling.json", "sampling.safetensors"):
        yield missing("sampling", note)
        return
    settings = _read_json(root / "sampling.json")
    ref = load_file(root / "sampling.safetensors")
    steps = settings["num_inference_steps"]
    sigmas = flow_match_sigmas(steps, settings.get("sigma_shift", 5.0))
    yield compare("sampling/sigmas", sigmas[:-1], ref["sigmas"])
    yield compare("sampling/timesteps", sigmas[:-1] * 1000, ref["timesteps"])
    noise = initial_noise(tuple(settings["noise_shape"]), settings["seed"])
    yield compare("sampling/noise", noise, ref["noise"])

    with torch.no_grad():
        audio = gather_audio_windows(model.project_audio(inputs["audio_features"]), windows)
    cond = DiTConditions(inputs["context_pos"], inputs["context_neg"], inputs["clip_feature"], inputs["y"],
                         audio, windows.k_lens_tensor(), settings["audio_scale"])
    guidance = GuidanceConfig(cfg=settings["cfg_scale"], audio_cfg=settings["audio_cfg_scale"])
    results: list[ParityResult] = []

    def check(name: str, ours: torch.Tensor) -> None:
        results.append(compare(f"sampling/{name}", ours, ref[name]) if name in ref else missing(f"sampling/{name}"))

    def on_passes(step: int, preds: dict) -> None:
        for key, pred in preds.items():
            check(f"step{step}.{PASS_NAMES[key]}", pred)

    def on_step(info: dict) -> None:
        check(f"step{info['i']}.pred_cfg", info["velocity"])
        check(f"step{info['i']}.latent_out", info["x"])

    final = sample_flow_euler(guided_velocity(model, cond, guidance, steps, on_passes=on_passes), noise, sigmas, on_step)
    yield from results
    yield compare("sampling/final_latent", final, ref["final_latent"])


def check_encoders(root: Path) -> Iterator[ParityResult]:
    """The VAE, CLIP and umT5 sets (``vae/``, ``clip/``, ``t5/``), where the fixture set has them; a folder that
    is there but incomplete fails."""
    complete = set()
    for part in ("vae", "clip", "t5"):
        if not (root / part).is_dir():
            continue  # this set has no such part
        if note := absent_files(root / part, f"{part}.pth", "config.json", f"{part}_io.safetensors"):
            yield missing(part, f"{part}/: {note}")
        else:
            complete.add(part)
    if "vae" in complete:
        from .encoders.vae import decode_latents, encode_video, load_vae

        vae = load_vae(root / "vae" / "vae.pth", config=root / "vae" / "config.json", dtype=torch.float32)
        io = load_file(root / "vae" / "vae_io.safetensors")
        with torch.no_grad():
            yield compare("vae/latent_mean_normalized", encode_video(vae, io["video"]), io["latent_mean_normalized"])
            yield compare("vae/decoded", decode_latents(vae, io["latent_mean_normalized"]), io["decoded"])
    if "clip" in complete:
        from .encoders.image import encode_image_clip, load_image_encoder

        clip = load_image_encoder(root / "clip" / "clip.pth", config=root / "clip" / "config.json", dtype=torch.float32)
        io = load_file(root / "clip" / "clip_io.safetensors")
        image224 = (io["image224_uint8_hwc"].float() * (2 / 255) - 1).permute(2, 0, 1)[None]  # official preprocess_image
        with torch.no_grad():
            yield compare("clip/penultimate", encode_image_clip(clip, io["image"]), io["penultimate"])
            yield compare("clip/penultimate224", encode_image_clip(clip, image224), io["penultimate224"])
    if "t5" in complete:
        from .encoders.text import load_text_encoder

        t5 = load_text_encoder(root / "t5" / "t5.pth", config=root / "t5" / "config.json", dtype=torch.float32)
        io = load_file(root / "t5" / "t5_io.safetensors")
        with torch.no_grad():
            out = t5(input_ids=io["ids"], attention_mask=io["mask"]).last_hidden_state
        yield compare("t5/output_full", out, io["output_full"])
        yield compare("t5/output_trimmed", out[:, : int(io["mask"].sum())], io["output_trimmed"])


def is_precision_set(root: Path) -> bool:
    """Whether ``root`` is laid out like ``tests/fixtures/official_bf16`` (outputs.safetensors and a stats.json
    holding the official bf16 errors)."""
    stats = root / "stats.json"
    if not ((root / "outputs.safetensors").is_file() and stats.is_file()):
        return False
    try:
        return BF16_STATS_KEY in _read_json(stats)
    except json.JSONDecodeError:
        return False


def load_precision_set_model(root: Path, dtype: torch.dtype) -> FantasyTalkingModel:
    """A precision set's DiT + adapter, computing in ``dtype``."""
    dit_file = _find(root / "dit", ("dit_bf16.safetensors", "dit.safetensors", "dit_comfy.safetensors")).name
    adapter_file = _find(root / "dit", ("fantasytalking.ckpt", "fantasytalking.safetensors")).name
    return load_fixture_model(root, dit_file, adapter_file, dtype)


def precision_set_passes(model: FantasyTalkingModel, inputs: dict[str, torch.Tensor],
                         stats: dict) -> dict[str, torch.Tensor]:
    """The passes of a precision set recomputed by ``model``, plus what is derived from them.

    Args:
        inputs: the set's ``inputs.safetensors``; stats: its ``stats.json`` (``passes``, ``num_frames``,
            ``cfg``, ``audio_cfg``).
    Returns:
        float32 [1, 16, F, H, W] each: ``u``, ``p``, ``pa`` (one DiT forward each, audio windows without their padding),
        ``guided`` = u + cfg (p - u) + audio_cfg (pa - p), and ``audio_term`` = pa - p.
    """
    windows = audio_windows_for_frames(inputs["audio_features"].shape[1], stats["num_frames"])
    preds = {}
    with torch.no_grad():
        audio = gather_audio_windows(model.project_audio(inputs["audio_features"]), windows)
        for name, spec in stats["passes"].items():
            cond = AudioConditioning(audio, windows.k_lens_tensor(), float(spec["audio_scale"]))
            preds[name] = model(inputs["x"], inputs["timestep"], inputs[spec["context"]], inputs["clip_feature"],
                                inputs["y"], cond).float()
    guidance = GuidanceConfig(cfg=stats["cfg"], audio_cfg=stats["audio_cfg"])
    preds["guided"] = combine_guidance({BF16_PASSES[k]: preds[k] for k in BF16_PASSES}, guidance)
    preds["audio_term"] = preds["pa"] - preds["p"]
    return preds


def reference_passes(outputs: dict[str, torch.Tensor], prefix: str = "fp32_") -> dict[str, torch.Tensor]:
    """A precision set's stored passes with ``prefix`` (``fp32_`` or ``official_bf16_``), plus their audio term."""
    ref = {k[len(prefix):]: v for k, v in outputs.items() if k.startswith(prefix)}
    if "pa" in ref and "p" in ref:
        ref["audio_term"] = ref["pa"] - ref["p"]
    return ref


def check_precision_set(root: Path) -> Iterator[ParityResult]:
    """float32 parity of every pass (``fp32/*``) and the bf16 error ratio of every pass and derived quantity
    that ``stats.json`` holds an official error for (``bf16/*``)."""
    stats = _read_json(root / "stats.json")
    inputs = load_file(root / "inputs.safetensors")
    ref = reference_passes(load_file(root / "outputs.safetensors"))
    ours32 = precision_set_passes(load_precision_set_model(root, torch.float32), inputs, stats)
    for name in (*stats["passes"], "guided"):
        yield compare(f"fp32/{name}", ours32[name], ref[name]) if name in ref else missing(f"fp32/{name}")
    del ours32
    ours16 = precision_set_passes(load_precision_set_model(root, torch.bfloat16), inputs, stats)
    for name, official in stats[BF16_STATS_KEY].items():
        if name not in ref or name not in ours16:
            yield missing(f"bf16/{name}")
            continue
        yield compare_error_ratio(f"bf16/{name}", ours16[name], ref[name], official)


def run_parity(root: str | Path) -> Iterator[ParityResult]:
    """Every comparison for the fixture set in ``root`` (either layout), one result at a time."""
    root = Path(root)
    if is_precision_set(root):
        yield from check_precision_set(root)
        return
    if not (root / "dit").is_dir():
        raise ModelNotFoundError(f"{root} is not a fixture set: it has no dit/ folder (see tests/fixtures/official "
                                 "and tests/fixtures/official_bf16).")
    yield from check_windows(root)
    yield from check_frame_rule(root)
    model = load_fixture_model(root, _find(root / "dit", ("dit.safetensors", "dit_comfy.safetensors")).name,
                               _find(root / "dit", ("fantasytalking.ckpt", "fantasytalking.safetensors")).name)
    yield from check_loaders(root, model)
    if note := absent_files(root, "inputs.safetensors", "inputs.json"):  # the DiT and sampling items need them
        yield missing("dit", note)
        yield missing("sampling", note)
        yield from check_encoders(root)
        return
    inputs = load_file(root / "inputs.safetensors")
    windows = audio_windows_for_frames(inputs["audio_features"].shape[1],
                                       _read_json(root / "inputs.json")["num_frames"])
    yield from check_dit(root, model, inputs, windows)
    yield from check_sampling(root, model, inputs, windows)
    yield from check_encoders(root)
