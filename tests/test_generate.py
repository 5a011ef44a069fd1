"""The main job end to end: `python -m fantasytalking_core generate --tiny` writes an mp4 with sound."""

import os
import re
import subprocess
import sys
import threading
import wave

import av
import numpy as np
import pytest
from cli_runs import run_here
from PIL import Image

from fantasytalking_core.loaders.model_paths import MissingModelsError, find_model_files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 60, 3), dtype=np.uint8)).save(d / "face.png")
    sr = 16000
    samples = (0.3 * np.sin(np.arange(int(0.5 * sr)) / 7) * 32767).astype(np.int16)
    with wave.open(str(d / "voice.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr), w.writeframes(samples.tobytes())
    return d


def generate(*args) -> subprocess.CompletedProcess:
    """``python -m fantasytalking_core generate ARGS`` as its own process: the program itself, exit code and all."""
    return subprocess.run([sys.executable, "-m", "fantasytalking_core", "generate", *args], capture_output=True, text=True)


def generate_here(*args) -> subprocess.CompletedProcess:
    """The same command line run in this process (``cli_runs.run_here``)."""
    return run_here(["generate", *args])


def test_tiny_run_writes_h264_with_aac_matching_the_video(inputs, tmp_path):
    out = tmp_path / "talking.mp4"
    proc = generate("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out", str(out),
                    "--tiny", "--steps", "2", "--image-size", "32", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "noise, not a portrait" in proc.stderr
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert video.codec_context.name == "h264" and float(video.average_rate) == 23.0
        assert len(frames) == 13 and (len(frames) - 1) % 4 == 0  # 0.5 s at 23 fps: 4*floor(11.5/4)+5
        assert frames[0].shape == (32, 32, 3)  # 90x60 portrait -> longest edge 32 (21 -> 32 after rounding up)
        assert audio.codec_context.name == "aac"
        assert abs(float(audio.duration * audio.time_base) - len(frames) / 23) < 0.07
    # same seed, same video
    again = tmp_path / "again.mp4"
    generate("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out", str(again),
             "--tiny", "--steps", "2", "--image-size", "32", "--seed", "3")
    with av.open(str(out)) as a, av.open(str(again)) as b:
        assert all(np.array_equal(x.to_ndarray(format="rgb24"), y.to_ndarray(format="rgb24"))
                   for x, y in zip(a.decode(video=0), b.decode(video=0)))


@pytest.mark.parametrize("image,audio,message", [
    ("missing.png", "voice.wav", "Image not found"),
    ("voice.wav", "voice.wav", "not a readable image"),
    ("face.png", "face.png", "no audio track"),
    ("face.png", "missing.wav", "not found"),
])
def test_bad_inputs_give_one_line_and_non_zero_exit(inputs, tmp_path, image, audio, message):
    proc = generate("--image", str(inputs / image), "--audio", str(inputs / audio), "--out",
                    str(tmp_path / "x.mp4"), "--tiny")
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_models_are_all_listed(inputs, tmp_path):
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--models", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    for where in ("diffusion_models", "fantasytalking", "text_encoders", "clip_vision", "vae", "audio_encoders"):
        assert f"{tmp_path / where}" in proc.stderr


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_finds_a_comfyui_models_tree(tmp_path):
    for rel in ("diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors",
                "fantasytalking/fantasytalking_fp16.safetensors", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                "text_encoders/umt5-xxl/tokenizer.json", "clip_vision/clip_vision_h.safetensors", "vae/wan_2.1_vae.safetensors",
                "audio_encoders/wav2vec2-base-960h.safetensors"):
        _touch(tmp_path / rel)
    files = find_model_files(tmp_path)
    assert files.dit.name == "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"
    assert files.tokenizer == tmp_path / "text_encoders/umt5-xxl"
    assert files.wav2vec2.name == "wav2vec2-base-960h.safetensors"


COMFY_TREE = ("fantasytalking/fantasytalking_fp16.safetensors", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
               "text_encoders/umt5-xxl/tokenizer.json", "clip_vision/clip_vision_h.safetensors",
               "vae/wan_2.1_vae.safetensors", "audio_encoders/wav2vec2-base-960h.safetensors")


def test_720p_is_picked_over_480p(tmp_path):
    # the released adapter was trained on 720P: with both present, 720P wins whatever the sort order of the names
    for rel in ("diffusion_models/a_wan2.1_i2v_480p_14B_bf16.safetensors",
                "diffusion_models/wan2.1_i2v_720p_14B_fp8_scaled.safetensors",
                "diffusion_models/z_wan2.1_i2v_480p_14B_fp16.safetensors", *COMFY_TREE):
        _touch(tmp_path / rel)
    assert find_model_files(tmp_path).dit.name == "wan2.1_i2v_720p_14B_fp8_scaled.safetensors"


GGUF_720P = "diffusion_models/wan2.1-i2v-14b-720p-Q8_0.gguf"


@pytest.mark.parametrize("other", [
    "loras/Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors",  # a LoRA named like the DiT
    "diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",  # Wan2.2: another model
    "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",  # 480P: runs, but 720P is the adapter's pairing
])
def test_finds_the_720p_gguf_whatever_else_matches_the_dit_names(tmp_path, other):
    # every DiT name pattern is ranked together, so a .safetensors elsewhere no longer beats the 720P GGUF
    for rel in (GGUF_720P, other, *COMFY_TREE):
        _touch(tmp_path / rel)
    assert find_model_files(tmp_path).dit == tmp_path / GGUF_720P


def test_finds_the_dit_only_where_comfyui_keeps_diffusion_models(tmp_path):
    for rel in ("loras/Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors", *COMFY_TREE):
        _touch(tmp_path / rel)
    with pytest.raises(MissingModelsError, match="diffusion model"):
        find_model_files(tmp_path)  # a LoRA is never the DiT
    _touch(tmp_path / "unet/wan2.1-i2v-14b-480p-Q4_K_M.gguf")  # ComfyUI-GGUF's folder
    assert find_model_files(tmp_path).dit == tmp_path / "unet/wan2.1-i2v-14b-480p-Q4_K_M.gguf"
    _touch(tmp_path / "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors")
    assert find_model_files(tmp_path).dit.suffix == ".gguf"  # Wan2.2 is ranked last, after any Wan2.1 480P


def test_a_flat_folder_of_model_files_is_found_and_a_clone_counts_its_weights_once(tmp_path):
    # --models pointed at one folder holding every file: the DiT search looked only in diffusion_models/ and unet/
    from pathlib import Path

    from fantasytalking_core.loaders.model_paths import _disk_bytes

    for rel in COMFY_TREE:  # the tokenizer is a folder of its own
        _touch(tmp_path / (rel if "tokenizer" in rel else Path(rel).name))
    _touch(tmp_path / Path(GGUF_720P).name)
    assert find_model_files(tmp_path).dit == tmp_path / Path(GGUF_720P).name
    # a Hugging Face clone of wav2vec2: the RAM check counted its .bin, TensorFlow copy and .git as well
    clone = tmp_path / "wav2vec2-base-960h"
    for name, size in (("model.safetensors", 300), ("pytorch_model.bin", 300), ("tf_model.h5", 300),
                       (".git/objects/pack.pack", 900), ("config.json", 2)):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (clone / name).write_bytes(bytes(size))
    assert _disk_bytes(clone) == 300


def _link(link, target):
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("folder links cannot be made here")


def test_finds_models_in_linked_folders_and_links_back_up_the_tree_end(tmp_path):
    models, store = tmp_path / "models", tmp_path / "other_disk"
    for rel in COMFY_TREE:
        _touch((store if rel.startswith("vae/") else models) / rel)
    _touch(models / GGUF_720P)
    _link(models / "vae", store / "vae")  # ComfyUI scans into it: --models must too
    _link(models / "vae" / "up", models)  # two links back up: a walk that follows them forever never ends
    _link(models / "text_encoders" / "again", models)
    result = {}

    def search():
        try:
            result["files"] = find_model_files(models)
        except MissingModelsError as exc:
            result["error"] = exc

    thread = threading.Thread(target=search, daemon=True)  # daemon: a walk that never ends fails the test, not the run
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the search went round the linked folders"
    assert "error" not in result, result.get("error")
    assert result["files"].vae == models / "vae/wan_2.1_vae.safetensors"
    assert result["files"].dit == models / GGUF_720P


def test_load_models_names_the_dit_file_that_fails(tmp_path):
    """The DiT's checks read keys, not paths: the error still says which file ``--models`` picked."""
    from dataclasses import replace

    import torch
    from safetensors.torch import save_file

    from fantasytalking_core.errors import ModelFileError
    from fantasytalking_core.loaders.model_paths import load_models
    from fantasytalking_core.tiny import make_tiny_models

    files = make_tiny_models(tmp_path / "models")
    lora = tmp_path / "diffusion_models" / "Wan21_I2V_14B_distill_lora_rank64.safetensors"
    lora.parent.mkdir()
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelFileError, match=re.escape(str(lora))):
        load_models(replace(files, dit=lora), compute_dtype=torch.float32)


def test_explicit_files_override_the_search_and_need_no_models_folder(tmp_path):
    for rel in ("diffusion_models/wan2.1_i2v_720p_14B_bf16.safetensors", *COMFY_TREE):
        _touch(tmp_path / rel)
    chosen = tmp_path / "elsewhere" / "my_480p_dit.safetensors"
    _touch(chosen)
    assert find_model_files(tmp_path, dit=chosen).dit == chosen
    explicit = {"dit": chosen, "adapter": tmp_path / COMFY_TREE[0], "text_encoder": tmp_path / COMFY_TREE[1],
                "tokenizer": tmp_path / "text_encoders/umt5-xxl", "image_encoder": tmp_path / COMFY_TREE[3],
                "vae": tmp_path / COMFY_TREE[4], "wav2vec2": tmp_path / COMFY_TREE[5]}
    assert find_model_files(None, **explicit).vae == tmp_path / COMFY_TREE[4]
    with pytest.raises(MissingModelsError, match=r"does_not_exist\.safetensors does not exist"):
        find_model_files(tmp_path, dit=tmp_path / "does_not_exist.safetensors")


def test_explicit_dit_flag_reaches_the_loader_and_480p_is_noted(inputs, tmp_path):
    for rel in COMFY_TREE:
        _touch(tmp_path / rel)
    dit = tmp_path / "wan2.1_i2v_480p_14B_bf16.safetensors"
    _touch(dit)
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                    str(tmp_path / "x.mp4"), "--models", str(tmp_path), "--dit", str(dit))
    # the empty file is found and loaded (then refused by the strict loader): the flag reached the loader
    assert "720P" in proc.stderr and dit.name in proc.stderr
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_finds_the_official_layout(tmp_path):
    wan = tmp_path / "Wan2.1-I2V-14B-720P"
    for rel in ("diffusion_pytorch_model.safetensors.index.json", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model",
                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth"):
        _touch(wan / rel)
    _touch(tmp_path / "fantasytalking_model.ckpt")
    _touch(tmp_path / "wav2vec2-base-960h/config.json")
    files = find_model_files(tmp_path)
    assert files.dit == wan / "diffusion_pytorch_model.safetensors.index.json"
    assert files.tokenizer == wan / "google/umt5-xxl" and files.wav2vec2 == tmp_path / "wav2vec2-base-960h"
    (tmp_path / "fantasytalking_model.ckpt").unlink()
    with pytest.raises(MissingModelsError, match="FantasyTalking audio adapter"):
        find_model_files(tmp_path)


def test_face_box_crops_and_pastes_back_at_the_portrait_size(inputs, tmp_path):
    out = tmp_path / "boxed.mp4"
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out", str(out),
                    "--tiny", "--steps", "1", "--image-size", "32", "--face-box", "10,20,40,60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with av.open(str(out)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (90, 60, 3)  # the full portrait, not the 32-pixel generation size
    bad = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out", str(out),
                   "--tiny", "--face-box", "40,20,10,60")
    assert bad.returncode != 0 and "x1 > x0" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be at least 1"),
    (["--audio-guidance-start", "0.8", "--audio-guidance-end", "0.2"], "audio guidance range"),
    (["--face-intensity", "2"], "face intensity"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU, so --device cuda is valid")),
])
def test_bad_settings_fail_before_any_model_loads(inputs, tmp_path, args, message):
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", *args)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert "--tiny: random tiny models" not in proc.stderr  # failed before making any model


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be at least 1"),
    (["--image", "missing.png"], "Image not found"),
    (["--audio", "missing.wav"], "not found"),
    (["--out", "."], "is a folder"),
    (["--crf", "52"], "crf must be a whole number from 0 (lossless) to 51"),
])
def test_bad_input_is_told_before_diffusers_and_transformers_are_imported(inputs, tmp_path, args, message):
    """Their import takes seconds (longer than the check itself by far): a typo is answered in a moment."""
    argv = ["generate", "--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
            str(tmp_path / "x.mp4"), "--tiny", *args]
    script = ("import sys; from fantasytalking_core.cli import main; code = main(sys.argv[1:]); "
              "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout.strip() == "[]"


def test_a_lora_changes_the_video_and_a_foreign_one_is_refused_before_the_encoders(inputs, tmp_path):
    from safetensors.torch import save_file
    from test_loaders_lora import kijai_lora

    lora, _ = kijai_lora(tmp_path / "style.safetensors")  # made for the tiny DiT's sizes
    args = ["--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--tiny", "--steps", "1",
            "--image-size", "32", "--seed", "3", "--max-frames", "5"]
    videos = []
    for name, extra in (("plain", []), ("lora", ["--lora", f"{lora}:1.5"])):
        out = tmp_path / f"{name}.mp4"
        proc = generate_here(*args, "--out", str(out), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with av.open(str(out)) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int))
    assert np.abs(videos[0] - videos[1]).max() > 8  # the LoRA acted

    import torch

    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}, tmp_path / "14b.safetensors")
    out = tmp_path / "foreign.mp4"
    proc = generate_here(*args, "--out", str(out), "--lora", str(tmp_path / "14b.safetensors"))
    assert proc.returncode != 0 and "match no layer" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = generate_here(*args, "--out", str(out), "--lora", f"{lora}:strong")
    assert proc.returncode != 0 and "FILE:STRENGTH" in proc.stderr and "random tiny models" not in proc.stderr


@pytest.mark.parametrize("extra, steps", [(["--distilled"], 4), (["--distilled", "--steps", "2"], 2)])
def test_distilled_preset_takes_four_steps_unless_told(inputs, tmp_path, extra, steps):
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--tiny",
                    "--image-size", "32", "--max-frames", "5", "--out", str(tmp_path / "d.mp4"), *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f" {steps}/{steps} " in proc.stderr and f"/{30}" not in proc.stderr  # the progress bar's total


def frames_of(path) -> np.ndarray:
    """[F, H, W, 3] uint8 decoded frames of an mp4."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# Two processes may round float32 differently in the last bits (no library promises bitwise equal GEMMs across
# processes or CPUs; a CI run once saw different frames). In a lossless video (--crf 0) that moves a pixel value by
# one level only where it lies within about 1e-4 of a rounding boundary: about 1e-4 of the values, each by at most
# 4 levels once converted to yuv420p and back. A rank wired wrongly moves many more, measured with the tiny model at
# 32 px: 16% of the values for a rank ignoring the negative prompt (cfg 1), 0.5% for a 2% wrong text guidance scale
# (cfg 4.9 for 5). Whether each pass's latents are exactly one process's is proven in test_runtime_parallel.py.
MOST_VALUES_OFF = 1e-3  # ten times the rounding estimate, five times below the smallest wiring error measured
MOST_LEVELS_OFF = 4


def assert_same_video(frames: np.ndarray, reference: np.ndarray, context: str = "") -> None:
    """``frames`` are ``reference`` (both [F, H, W, 3] uint8 of lossless videos) up to float rounding between
    processes (see above)."""
    assert frames.shape == reference.shape, f"frames {frames.shape} against {reference.shape}. {context}"
    off = np.abs(frames.astype(int) - reference)
    assert (off > 0).mean() <= MOST_VALUES_OFF and off.max() <= MOST_LEVELS_OFF, (  # what a failure needs
        f"{(off > 0).mean():.2%} of the values differ, by at most {off.max()} levels. {context}")


def test_torchrun_with_two_guidance_ranks_writes_the_single_process_video(inputs, tmp_path):
    """torchrun, 2 processes, --parallel cfg=2: rank 0 alone writes, and the video is one process's (up to float
    rounding between processes); then the same run over two 'machines': two torchrun launchers of one process
    each meeting through the c10d rendezvous (as on two hosts, here both on 127.0.0.1, each in its own folder):
    one of them writes, the same video."""
    from distributed import free_port

    args = ["--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--tiny", "--steps", "2",
            "--image-size", "32", "--seed", "3", "--device", "cpu", "--crf", "0"]  # lossless: see assert_same_video
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it
    single = generate_here(*args, "--out", str(tmp_path / "one.mp4"))  # one process: this one
    assert single.returncode == 0, single.stderr[-2000:]
    one = frames_of(tmp_path / "one.mp4")
    assert one.shape == (13, 32, 32, 3)
    generate_two = ["-m", "fantasytalking_core", "generate", *args, "--out", "two.mp4", "--parallel", "cfg=2"]
    out = tmp_path / "standalone"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *generate_two], capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and sorted(p.name for p in out.iterdir()) == ["two.mp4"]
    assert_same_video(frames_of(out / "two.mp4"), one, proc.stderr[-1500:])

    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    launchers = []
    try:
        for node, folder in enumerate(nodes):
            folder.mkdir()
            launchers.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-machines",
                 "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=120", "--local-addr", "127.0.0.1",
                 *generate_two], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder))
        outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    finally:
        for launcher in launchers:  # one that failed to meet the other is not left behind
            if launcher.poll() is None:
                launcher.kill()
                launcher.communicate()
    for launcher, (_, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stderr[-3000:]
    written = [folder for folder in nodes if any(folder.iterdir())]
    assert sum(stdout.count("wrote ") for stdout, _ in outputs) == 1 and len(written) == 1
    assert sorted(p.name for p in written[0].iterdir()) == ["two.mp4"]
    assert_same_video(frames_of(written[0] / "two.mp4"), one,
                      f"{written[0].name} wrote it; launchers said: " + " || ".join(e[-1500:] for _, e in outputs))


@pytest.mark.parametrize("layout, world, message", [
    ("cfg=4", 4, "--parallel cfg=4: a step of this run has at most 3 guidance passes to spread"),
    ("cfg=2", 1, "--parallel cfg=2,ring=1,ulysses=1 needs 2 processes (cfg x ring x ulysses); 1 were started"),
    ("cfg=2", None, "--parallel needs processes started by torchrun, e.g. torchrun --nproc-per-node 2"),
    ("ulysses=2", 2, "ring/ulysses split the video tokens over GPUs (one per process); on the CPU use cfg=N alone"),
    ("tensor=2", 2, "unknown axis 'tensor'"),
])
def test_parallel_layouts_that_cannot_run_are_one_line(inputs, tmp_path, monkeypatch, layout, world, message):
    """Refused before any model loads, one line each, as rank 0 of ``world`` torchrun processes sees it (None:
    started without torchrun)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", str(world)), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(name, value)
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", "cpu", "--parallel", layout)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"] and message in proc.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_more_processes_than_gpus_on_a_machine_is_one_clear_error(monkeypatch):
    """Checked before any model loads: 4 processes on a machine with 2 GPUs (torchrun's LOCAL_WORLD_SIZE)."""
    import argparse

    import torch

    from fantasytalking_core.cli import _check_parallel_run
    from fantasytalking_core.errors import SettingsError
    from fantasytalking_core.pipeline import GenerationSettings
    from fantasytalking_core.runtime.parallel import parse_parallel

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)  # as PyTorch for Linux with CUDA
    args = argparse.Namespace(device="cuda", lora=[], offload_blocks=False, gpu_memory=None)  # as argparse gives them
    with pytest.raises(SettingsError, match="torchrun started 4 processes on this machine, which has 2 GPU"):
        _check_parallel_run(parse_parallel("cfg=2,ulysses=2"), args, GenerationSettings())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of 2 GPUs: fits
    _check_parallel_run(parse_parallel("cfg=2,ulysses=2"), args, GenerationSettings())
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)  # PyTorch for Windows: no NCCL
    with pytest.raises(SettingsError, match=r"Several GPUs need NCCL, .* run on Linux \(on Windows: in WSL2\)"):
        _check_parallel_run(parse_parallel("cfg=2,ulysses=2"), args, GenerationSettings())


@pytest.mark.parametrize("local_rank, checks", [("0", True), ("1", False)])
def test_torchrun_ranks_on_one_machine_check_the_ram_for_all_their_copies_once(inputs, tmp_path, monkeypatch,
                                                                              local_rank, checks):
    # each rank loads a copy of every model: 2 ranks need twice the RAM, which the first local rank checks before
    # any of them reads a weight (a later check would count the copies the others are already reading)
    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.loaders import model_paths

    seen = []

    def stop_here(*args, **kwargs):
        seen.append((kwargs["processes"], kwargs["check_memory"]))
        raise FantasyTalkingError("stopped before loading")

    for name, value in (("RANK", local_rank), ("WORLD_SIZE", "2"), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(model_paths, "load_models", stop_here)
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", "cpu", "--parallel", "cfg=2")
    assert seen == [(2, checks)] and proc.returncode == 2 and "stopped before loading" in proc.stderr


@pytest.mark.parametrize("parallel, device, tried_on", [(True, "cuda", "cuda:1"), (False, "cpu", "cpu")])
def test_the_attention_library_is_tried_on_the_runs_own_device_before_any_model_loads(
        inputs, tmp_path, monkeypatch, parallel, device, tried_on):
    # a torchrun rank runs on cuda:LOCAL_RANK: trying the library on GPU 0 opened a CUDA context there from every
    # rank; --device cpu must try it on the CPU, where flash kernels cannot run
    import torch

    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.runtime import attention

    tried = []

    def stop_here(name, device=None):
        tried.append((name, str(device)))
        raise FantasyTalkingError("stopped at the attention check")

    monkeypatch.setattr(attention, "check_attention", stop_here)
    extra = []
    if parallel:
        for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # 2 GPUs and NCCL, as PyTorch for Linux
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
        extra = ["--parallel", "cfg=2"]
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", device, *extra)
    assert tried == [("sdpa", tried_on)] and "stopped at the attention check" in proc.stderr
    assert "random tiny models" not in proc.stderr  # nothing loaded before it


@pytest.mark.parametrize("option, message", [
    ("--lora", "LoRAs are not applied to weights sharded over GPUs"),
    ("--offload-blocks", "fsdp already splits the weights over the GPUs, so the blocks do not also stream; turn "
                         "off --offload-blocks, or leave out fsdp"),
])
def test_what_sharded_weights_cannot_do_is_refused_before_any_model_loads(inputs, tmp_path, monkeypatch, option,
                                                                         message):
    import torch
    from test_loaders_lora import kijai_lora

    extra = [option, str(kijai_lora(tmp_path / "style.safetensors")[0])] if option == "--lora" else [option]
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    # a machine with 2 GPUs and NCCL, as PyTorch for Linux with CUDA: the checks run before any GPU is touched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", "cuda", "--parallel", "cfg=2,fsdp", *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "random tiny models" not in proc.stderr and not (tmp_path / "x.mp4").exists()


def test_a_gpu_run_asks_for_expandable_segments_before_any_model_loads(inputs, tmp_path, monkeypatch):
    import torch

    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.runtime import memory

    asked = []

    def stop_here(device: torch.device) -> bool:
        asked.append(device)
        raise FantasyTalkingError("stopped after the allocator setting")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(memory, "use_expandable_segments", stop_here)
    proc = generate_here("--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", "cuda")
    assert asked == [torch.device("cuda")]
    assert proc.returncode == 2 and "stopped after the allocator setting" in proc.stderr
    assert "random tiny models" not in proc.stderr  # nothing loaded before it


def test_tokens_the_sequence_ranks_cannot_split_are_refused_before_any_model_loads(inputs, tmp_path, monkeypatch):
    # 720x720 frames are 45 x 45 patches: an odd count a frame, so an odd number of latent frames cannot be halved;
    # the DiT refused it only at its first forward, after every rank had loaded the model
    import torch

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # 2 GPUs and NCCL, as PyTorch for Linux
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    Image.new("RGB", (300, 300), "grey").save(tmp_path / "square.png")
    proc = generate_here("--image", str(tmp_path / "square.png"), "--audio", str(inputs / "voice.wav"), "--out",
                         str(tmp_path / "x.mp4"), "--tiny", "--device", "cuda", "--parallel", "ulysses=2",
                         "--image-size", "720", "--max-frames", "9")  # 3 latent frames
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "9 frames at 720x720 are 6075 video tokens, which the 2 ring x ulysses ranks cannot split" in proc.stderr
    assert "random tiny models" not in proc.stderr


@pytest.mark.parametrize("part", ["tokenizer", "wav2vec2"])
def test_a_wrong_small_part_is_refused_before_the_dit_loads(tmp_path, monkeypatch, part):
    """The parts load smallest first: an empty folder given as the tokenizer or wav2vec2 fails in seconds, before
    the 14B DiT is read."""
    from dataclasses import replace

    import torch

    from fantasytalking_core.errors import FantasyTalkingError
    from fantasytalking_core.loaders import wan_dit
    from fantasytalking_core.loaders.model_paths import load_models
    from fantasytalking_core.tiny import make_tiny_models

    files = make_tiny_models(tmp_path / "models")
    (tmp_path / "empty").mkdir()
    read = []
    monkeypatch.setattr(wan_dit, "load_wan_dit", lambda *args, **kwargs: read.append(args))
    with pytest.raises(FantasyTalkingError):
        load_models(replace(files, **{part: tmp_path / "empty"}), compute_dtype=torch.float32)
    assert read == []
