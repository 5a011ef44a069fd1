"""The native route proven inside a real ComfyUI: FantasyTalking Apply Audio on ComfyUI's own Wan model gives the
numbers of the pack's engine.

Run with ComfyUI's Python (it imports ComfyUI in-process on the CPU, no server):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/comfyui_native_check.py

It writes a tiny Wan2.1-I2V file with 128-wide heads (ComfyUI infers the head count as width / 128) in ComfyUI's
key layout, the official bf16 fixture's adapter and a LoRA in ComfyUI's format, loads the DiT through ComfyUI's
``load_diffusion_model`` (what Load Diffusion Model calls) and the same files through the engine's loaders, and
checks, all in float32:

1. each guidance pass of the patched model's denoiser equals the engine's FantasyTalking model, within 1e-4 relative;
2. audio scale 0 equals the unpatched model exactly, and the unpatched model after a patched run is bit-identical
   to before (the input MODEL is untouched);
3. a LoRA changes the patched model as it changes the unpatched one (exactly, at audio scale 0) and still acts
   with the audio on;
4. FantasyTalking Guider + ComfyUI's Euler sampler reach the engine sampler's final latent within 1e-4 relative
   (with an audio-guidance step range), and so does core DualCFGGuider (regular) set up as docs/comfyui.md says;
5. a T2V model and a frame-count mismatch are refused with one line naming the fix;
6. the same DiT as a Q8_0 GGUF file, loaded by city96's ComfyUI-GGUF (``custom_nodes/ComfyUI-GGUF`` of the tree,
   fetched there for the test: ``git clone https://github.com/city96/ComfyUI-GGUF``; never part of this repository),
   patched, equals the engine on the same GGUF file within 1e-4 per pass, and exactly the unpatched GGUF model at
   audio scale 0.

Exit status 0 when every check passes; each check prints one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = PACK_ROOT / "tests" / "fixtures" / "official_bf16"
TEXT_DIM = 4096  # ComfyUI builds Wan with umT5-XXL's width
REL_TOL = 1e-4  # the bound; float32 on both sides, only summation order differs
SEED, STEPS, SHIFT = 7, 4, 5.0


def boot_comfy(tree: Path, models: Path):
    """Import ComfyUI on the CPU with ``models`` as its models folder; return the pack's native node module."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(tree))
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    folder_paths.folder_names_and_paths["fantasytalking"] = ([str(models / "fantasytalking")], {".ckpt", ".safetensors"})
    import_custom_node("fantasytalking_pack", PACK_ROOT)
    return importlib.import_module("fantasytalking_pack.nodes.native")


def import_custom_node(name: str, folder: Path) -> None:
    """Import a custom-node folder as a package, as ComfyUI does (its relative imports work)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def load_comfyui_gguf(tree: Path):
    """city96's ComfyUI-GGUF from the tree's custom_nodes, imported as ComfyUI imports a custom node."""
    folder = tree / "custom_nodes" / "ComfyUI-GGUF"
    if not (folder / "__init__.py").is_file():
        raise SystemExit(f"{folder} is missing: git clone https://github.com/city96/ComfyUI-GGUF there (the native "
                         "route's GGUF check loads a GGUF file through it).")
    import_custom_node("ComfyUI_GGUF", folder)
    return importlib.import_module("ComfyUI_GGUF.nodes")


def write_models(models: Path) -> dict:
    """The tiny DiT (float32, ``model.diffusion_model.`` keys as ComfyUI's repackaged files), its config for the
    engine, the adapter, a LoRA and a T2V variant."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(5)
    dit = {k: v.float() for k, v in load_file(FIXTURE / "dit" / "dit_bf16.safetensors").items()}
    dim = dit["patch_embedding.weight"].shape[0]
    dit["text_embedding.0.weight"] = torch.randn(dim, TEXT_DIM, generator=g) / TEXT_DIM**0.5
    paths = {"dit": models / "diffusion_models" / "wan_i2v_tiny.safetensors",
             "t2v": models / "diffusion_models" / "wan_t2v_tiny.safetensors",
             "adapter": models / "fantasytalking" / "fantasytalking_model.ckpt"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in dit.items()}, paths["dit"])
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in dit.items()
               if not k.startswith("img_emb.") and "_img" not in k}, paths["t2v"])
    shutil.copyfile(FIXTURE / "dit" / "fantasytalking.ckpt", paths["adapter"])
    config = json.loads((FIXTURE / "dit" / "config.json").read_text()) | {"text_dim": TEXT_DIM}
    rank = 4
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.2.ffn.0"):
        out_f, in_f = dit[name + ".weight"].shape
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
    return {"paths": paths, "config": config, "lora": lora, "num_layers": config["num_layers"]}


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> int:
    tree = Path(os.environ["COMFYUI_PATH"]).resolve()
    work = Path(tempfile.mkdtemp(prefix="ft-native-"))
    try:
        return run(tree, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(tree: Path, work: Path) -> int:
    native = boot_comfy(tree, work / "models")
    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import torch
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from safetensors.torch import load_file

    from fantasytalking_core.audio.encode import AudioFeatures
    from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.loaders.wan_dit import load_wan_dit
    from fantasytalking_core.model.adapter import AudioConditioning
    from fantasytalking_core.sampling.denoise import generate_latents
    from fantasytalking_core.sampling.euler import initial_noise
    from fantasytalking_core.sampling.guidance import GuidanceConfig
    from fantasytalking_core.sampling.schedule import flow_match_sigmas

    convert = importlib.import_module("fantasytalking_pack.nodes.convert")
    report = Report()
    files = write_models(work / "models")
    paths = files["paths"]
    dual = next(k for k, v in native.AUDIO_ON.items() if v == "dual_cfg")

    # the engine on the same files, float32
    engine = load_audio_adapter(paths["adapter"], load_wan_dit(paths["dit"], config=files["config"],
                                                               dtype=torch.float32, compute_dtype=torch.float32))
    unpatched = comfy.sd.load_diffusion_model(str(paths["dit"]), model_options={"dtype": torch.float32})
    adapter = native.AdapterLoader.execute("fantasytalking_model.ckpt", "default").args[0]

    inputs = load_file(FIXTURE / "inputs.safetensors")
    x, y = inputs["x"], inputs["y"]
    frames, num_frames = x.shape[2], 4 * x.shape[2] - 3
    features = inputs["audio_features"][0]
    encoded = convert.EncodedAudio(AudioFeatures(features, num_frames, 23.0, 1.0, torch.zeros(16000)), {})
    g = torch.Generator().manual_seed(9)

    def text(rows):  # umT5-like context, zero rows past the prompt as ComfyUI's padded output
        t = torch.zeros(1, 512, TEXT_DIM)
        t[:, :rows] = torch.randn(1, rows, TEXT_DIM, generator=g)
        return t

    text_pos, text_neg = text(11), text(20)
    clip = inputs["clip_feature"]

    def patch(scale: float, model=unpatched, audio_on=dual):
        return native.ApplyAudio.execute(model, adapter, encoded, scale, audio_on).args[0]

    def denoiser(patcher, chunks=(0, 1, 2)):
        """The patched DiT as ComfyUI calls it: one batch, a chunk per entry of cond_or_uncond."""
        mm.load_models_gpu([patcher])
        n = len(chunks)
        context = torch.cat([text_neg if c == 0 else text_pos for c in chunks])
        t = inputs["timestep"].expand(n).float()
        with torch.no_grad():
            return patcher.model.diffusion_model(torch.cat([x, y], 1).expand(n, -1, -1, -1, -1), t, context,
                                                 clip_fea=clip.expand(n, -1, -1),
                                                 transformer_options={"cond_or_uncond": list(chunks)}).float()

    # 1. each pass equals the engine
    windows = audio_windows_for_frames(features.shape[0], num_frames)
    with torch.no_grad():
        tokens = gather_audio_windows(engine.project_audio(features[None]), windows)
        reference = engine(x.expand(3, -1, -1, -1, -1), inputs["timestep"].expand(3), torch.cat([text_neg, text_pos, text_pos]),
                           clip.expand(3, -1, -1), y.expand(3, -1, -1, -1, -1),
                           AudioConditioning(tokens, windows.k_lens_tensor(), torch.tensor([0.0, 0.0, 1.0])))
    before = denoiser(unpatched)
    patched = patch(1.0)
    out = denoiser(patched)
    for i, name in enumerate(("negative", "positive", "positive + audio")):
        err = rel_err(out[i], reference[i])
        report.check(f"native denoiser = engine, {name} pass", err <= REL_TOL, f"relative error {err:.2e}")
    report.check("the audio pass differs from the pass without it", rel_err(out[2], out[1]) > 100 * REL_TOL)

    # 1b. under ComfyUI's context windows: one call holds the window's frames (and the causal anchor before them)
    from comfy.context_windows import IndexListContextWindow
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode

    window = IndexListContextWindow([2, 3, 4], dim=2, total_frames=frames)
    window.causal_anchor_index = 1
    held = [1, 2, 3, 4]
    mm.load_models_gpu([patched])
    with torch.no_grad():
        windowed = patched.model.diffusion_model(torch.cat([x, y], 1)[:, :, held], inputs["timestep"].float(), text_pos,
                                                 clip_fea=clip, transformer_options={"cond_or_uncond": [2],
                                                                                     "context_window": window})
        expected = engine(x[:, :, held], inputs["timestep"], text_pos, clip, y[:, :, held],
                          AudioConditioning(tokens[:, held], windows.k_lens_tensor()[held], 1.0))
    err = rel_err(windowed, expected)
    report.check("context window: a call on frames 1 (causal anchor), 2-4 hears windows 1-4, as the engine",
                 err <= REL_TOL, f"relative error {err:.2e}")

    # 2. scale 0 exact; the input model untouched
    report.check("audio scale 0 = unpatched model, bit for bit", torch.equal(denoiser(patch(0.0)), before))
    report.check("unpatched model after a patched run = before, bit for bit", torch.equal(denoiser(unpatched), before))

    # 3. LoRA
    lora_unpatched, _ = comfy.sd.load_lora_for_models(unpatched, None, files["lora"], 1.0, 0)
    lora_zero, _ = comfy.sd.load_lora_for_models(patch(0.0), None, files["lora"], 1.0, 0)
    lora_audio, _ = comfy.sd.load_lora_for_models(patched, None, files["lora"], 1.0, 0)
    with_lora = denoiser(lora_unpatched)
    report.check("the LoRA changes the unpatched model", rel_err(with_lora, before) > 100 * REL_TOL)
    report.check("LoRA on the patched model (scale 0) = LoRA on the unpatched, bit for bit",
                 torch.equal(denoiser(lora_zero), with_lora))
    lora_out = denoiser(lora_audio)
    report.check("the LoRA changes the patched model's audio pass",
                 rel_err(lora_out[2], out[2]) > 100 * REL_TOL and torch.equal(lora_out[:2], with_lora[:2]))

    # 4. samplers: the guider and DualCFGGuider against the engine's sampler
    sigmas = native.Sigmas.execute(STEPS, SHIFT).args[0]
    report.check("FantasyTalking Sigmas = the engine's schedule", torch.equal(sigmas, flow_match_sigmas(STEPS, SHIFT)))
    noise = initial_noise(tuple(x.shape), SEED)
    report.check("RandomNoise with the same seed = the engine's noise",
                 torch.equal(comfy.sample.prepare_noise(torch.zeros(x.shape), SEED), noise))
    raw_image = torch.randn(1, 16, frames, x.shape[3], x.shape[4], generator=g)
    mask = torch.ones(1, 1, frames, x.shape[3], x.shape[4])
    mask[:, :, :1] = 0.0  # WanImageToVideo: the first latent frame is known
    vision = comfy.clip_vision.Output()
    vision.penultimate_hidden_states = clip
    extras = {"concat_latent_image": raw_image, "concat_mask": mask, "clip_vision_output": vision}
    positive, negative = [[text_pos, dict(extras)]], [[text_neg, dict(extras)]]
    image_latents = patched.model.concat_cond(noise=noise, concat_latent_image=raw_image, concat_mask=mask,
                                              device=torch.device("cpu"))  # y exactly as the native model sees it
    sampler = comfy.samplers.sampler_object("euler")

    def engine_latents(guidance):
        return generate_latents(engine, text_pos, text_neg, clip, image_latents, features, num_frames,
                                guidance=guidance, sigmas=sigmas, seed=SEED)

    def audio_guider(model, guidance):
        guider = native.AudioGuider(model)
        guider.set_conds(positive, negative)
        guider.set_guidance(guidance)
        return guider

    def run(guider, **kwargs):
        """A whole Euler run from the engine's noise, ComfyUI's output as it is."""
        return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=SEED, **kwargs)

    def final_latent(guider, **kwargs):
        """The run's latent in the normalised space the engine samples in."""
        return guider.model_patcher.model.process_latent_in(run(guider, **kwargs))

    guidance = GuidanceConfig(cfg=5.0, audio_cfg=4.0, audio_start=0.0, audio_end=0.5)
    loaded_while_sampling = []
    latent = final_latent(audio_guider(patched, guidance), callback=lambda *_: loaded_while_sampling.append(
        [m.model for m in mm.current_loaded_models]))
    report.check("while sampling, ComfyUI's memory management holds the adapter with the patched model",
                 bool(loaded_while_sampling) and all(adapter in models and any(m.model is patched.model for m in models)
                                                     for models in loaded_while_sampling))
    err = rel_err(latent, engine_latents(guidance))
    report.check("FantasyTalking Guider + Euler = engine sampler (audio guidance on half the steps)", err <= REL_TOL,
                 f"relative error {err:.2e}")
    # caches keyed by cond uuid (core EasyCache) must see the no-audio and the audio pass as two conds
    seen_uuids = []
    recording = patched.clone()

    def record_uuids(apply_model, args):
        seen_uuids.append(tuple(args["c"]["transformer_options"].get("uuids", ())))
        return apply_model(args["input"], args["timestep"], **args["c"])

    recording.set_model_unet_function_wrapper(record_uuids)
    run(audio_guider(recording, guidance))
    first_step = {u for call in seen_uuids[:3] for u in call}  # step 0 runs 3 passes, batched or not
    report.check("the guider's three passes carry three cond uuids (EasyCache keeps the audio pass apart)",
                 len(first_step) == 3 and None not in first_step, f"uuids of step 0: {len(first_step)}")
    windowed_model = WanContextWindowsManualNode.execute(patched, 9, 4, "standard_static", 1, False, "pyramid",
                                                         False).args[0]  # 3 latent frames, 1 shared
    latent_windows = run(audio_guider(windowed_model, guidance))
    silent = audio_guider(WanContextWindowsManualNode.execute(patch(0.0), 9, 4, "standard_static", 1, False,
                                                              "pyramid", False).args[0], guidance)
    report.check("a run under WanContextWindowsManual completes and the audio acts in every window",
                 bool(torch.isfinite(latent_windows).all()) and rel_err(latent_windows, run(silent)) > 100 * REL_TOL)
    dual_guider = Guider_DualCFG(patched)
    dual_guider.set_conds(positive, positive, negative)
    dual_guider.set_cfg(4.0, 5.0)  # cfg_conds = audio cfg, cfg_cond2_negative = text cfg
    err = rel_err(final_latent(dual_guider), engine_latents(GuidanceConfig(cfg=5.0, audio_cfg=4.0)))
    report.check("DualCFGGuider (cond1 = cond2 = positive) + Euler = engine sampler", err <= REL_TOL,
                 f"relative error {err:.2e}")

    # two passes at text cfg 1 (step-distilled LoRAs): positive, positive with audio
    two_pass = GuidanceConfig(cfg=1.0, audio_cfg=4.0)
    err = rel_err(final_latent(audio_guider(patched, two_pass)), engine_latents(two_pass))
    report.check("FantasyTalking Guider at cfg 1 (two passes) = engine sampler", err <= REL_TOL,
                 f"relative error {err:.2e}")
    # KSampler / CFG Guider with audio on the positive pass = the engine outside the audio-guidance range
    cfg_model = patch(1.0, audio_on=next(k for k, v in native.AUDIO_ON.items() if v == "cfg"))
    plain = comfy.samplers.CFGGuider(cfg_model)
    plain.set_conds(positive, negative)
    plain.set_cfg(5.0)
    err = rel_err(final_latent(plain), engine_latents(GuidanceConfig(cfg=5.0, audio_cfg=4.0, audio_start=0.0,
                                                                     audio_end=0.0)))
    report.check("CFGGuider with audio on the positive (audio_on: KSampler) = engine without audio guidance",
                 err <= REL_TOL, f"relative error {err:.2e}")

    # 5. refusals
    def denoiser_with_frames(patcher, n_frames):
        mm.load_models_gpu([patcher])
        with torch.no_grad():
            patcher.model.diffusion_model(torch.cat([x, y], 1)[:, :, :n_frames], inputs["timestep"], text_pos,
                                          clip_fea=clip, transformer_options={"cond_or_uncond": [2]})

    t2v = comfy.sd.load_diffusion_model(str(paths["t2v"]), model_options={"dtype": torch.float32})
    for name, call, expect in (
        ("a T2V model is refused", lambda: patch(1.0, model=t2v), "no CLIP image branch"),
        ("a frame-count mismatch is refused", lambda: denoiser_with_frames(patched, frames - 1), "latent frames"),
        ("the guider refuses an unpatched model",
         lambda: native.Guider.execute(unpatched, positive, negative, 5.0, 4.0, 0.0, 1.0), "Apply Audio"),
    ):
        try:
            call()
            report.check(name, False, "no error")
        except ValueError as exc:
            report.check(name, expect in str(exc) and "\n" not in str(exc), str(exc))

    # 6. GGUF through ComfyUI-GGUF
    gguf_nodes = load_comfyui_gguf(tree)
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    from model_files import write_gguf

    gguf_path = paths["dit"].with_suffix(".gguf")
    write_gguf({k[len("model.diffusion_model."):]: v for k, v in load_file(paths["dit"]).items()}, gguf_path)
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.add_model_folder_path("diffusion_models", str(gguf_path.parent))
    gguf_model = gguf_nodes.UnetLoaderGGUF().load_unet(gguf_path.name)[0]
    gguf_engine = load_audio_adapter(paths["adapter"], load_wan_dit(gguf_path, config=files["config"],
                                                                    compute_dtype=torch.float32))
    with torch.no_grad():
        gguf_reference = gguf_engine(x.expand(3, -1, -1, -1, -1), inputs["timestep"].expand(3),
                                     torch.cat([text_neg, text_pos, text_pos]), clip.expand(3, -1, -1),
                                     y.expand(3, -1, -1, -1, -1),
                                     AudioConditioning(tokens, windows.k_lens_tensor(), torch.tensor([0.0, 0.0, 1.0])))
    gguf_before = denoiser(gguf_model)
    gguf_out = denoiser(patch(1.0, model=gguf_model))
    for i, name in enumerate(("negative", "positive", "positive + audio")):
        err = rel_err(gguf_out[i], gguf_reference[i])
        report.check(f"GGUF (ComfyUI-GGUF) native denoiser = engine on the same file, {name} pass", err <= REL_TOL,
                     f"relative error {err:.2e}")
    report.check("GGUF: audio scale 0 = unpatched GGUF model, bit for bit",
                 torch.equal(denoiser(patch(0.0, model=gguf_model)), gguf_before))
    report.check("GGUF: quantized weights really differ from float32", rel_err(gguf_before, before) > 10 * REL_TOL)

    print(f"{'all checks passed' if not report.failed else f'{report.failed} check(s) failed'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
