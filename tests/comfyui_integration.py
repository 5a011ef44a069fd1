"""Run the node pack inside a real ComfyUI, through its HTTP API, on tiny random-weight models.

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfyui_integration.py

What it does, in a work folder it owns (``COMFYUI_TEST_DIR``, default ``<tmp>/fantasytalking-comfyui-test``):

1. installs the pack's ``requirements.txt`` into ComfyUI's Python as ComfyUI Manager would, and checks that torch is
   the same version afterwards;
2. lays out a ComfyUI base directory (``--base-directory``, so the ComfyUI tree itself is left alone) with the pack
   linked into ``custom_nodes/`` and, under the usual file names, tiny random-weight models in the real file
   formats in ``models/`` (ComfyUI's own loaders pick their architecture from the weights: the text encoder is a
   T5-base, the CLIP vision a full-size ViT-L/14, the Wan2.1 VAE has base width 4; a ``config.json`` in
   ``diffusion_models/`` gives the tiny DiT matching text and image widths). They are kept and reused;
3. boots ComfyUI on a free loopback port, checks the log for import failures of the pack and ``/object_info`` for
   every node (category, a tooltip on every input, the model dropdowns);
4. checks that a missing model file is refused before the run (``validate_inputs``);
5. runs each ``example_workflows/api/*.json`` through ``POST /prompt`` with two speed overrides (64-pixel frames,
   3 steps) and checks the saved mp4: frame count and rate from the recording, a video and an AAC audio stream as
   long as the video (or the recording, when that is shorter); the sampler's progress over the websocket;
6. interrupts a 200-step run after its first step and checks that it stops there;
7. runs tests/comfyui_native_check.py (the native route's numbers) and tests/comfyui_conditioning_check.py (the
   conditioning nodes on full-size random umT5-XXL and ViT-H/14 files against the library: 14 GB of disk in the
   work folder, written once, and 24 GB of RAM; ``COMFYUI_SKIP_FULL_SIZE=1`` leaves it out and says so).

Environment: ``COMFYUI_PATH`` (required), ``COMFYUI_PYTHON`` (default: ``venv/`` or ``.venv/`` in or beside the tree,
else this Python), ``COMFYUI_TEST_DIR``, ``COMFYUI_ARGS`` (extra ``main.py`` flags). Exit status 0 when every check
passed; the summary goes to stdout.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:  # fantasytalking_core without an install
    sys.path.append(str(PACK_ROOT))
FIXTURES = PACK_ROOT / "tests" / "fixtures" / "official"
WORKFLOWS = PACK_ROOT / "example_workflows"
PACK_LINK = "ComfyUI-FantasyTalking"
NODE_IDS = ("FantasyTalkingModelLoader", "FantasyTalkingWav2Vec2Loader", "FantasyTalkingAudioEncode",
            "FantasyTalkingIdentityEncode", "FantasyTalkingMotion", "FantasyTalkingSampler", "FantasyTalkingFaceCrop",
            "FantasyTalkingFacePasteBack", "FantasyTalkingIdentityCheck", "FantasyTalkingTextEncode",
            "FantasyTalkingAdapterLoader", "FantasyTalkingApplyAudio", "FantasyTalkingGuider", "FantasyTalkingSigmas")
# Widget values changed for speed on a CPU; everything else runs as the example workflow says.
SPEED_OVERRIDES = {"FantasyTalkingIdentityEncode": {"image_size": 64}, "FantasyTalkingSampler": {"steps": 3}}
MODELS_VERSION = "7"
INTERRUPT_STEPS = 200  # the sampler's largest step count  # bump when the test models change, so stale ones are rewritten
TEXT_WIDTH, IMAGE_WIDTH = 768, 1024  # T5-base, CLIP ViT-L/14 penultimate


# ---- tiny models in the real formats --------------------------------------------------------------------------------


def random_state_dict(module, seed: int, dtype) -> dict:
    """Random weights for every tensor of ``module`` (may be on the meta device): norm scales 1, biases 0, other
    tensors N(0, 1/fan_in), in ``dtype``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if t.ndim == 1 and name.endswith("bias"):
            value = torch.zeros(t.shape)
        elif t.ndim == 1 and ("norm" in name or name.endswith("layer_norm.weight")):
            value = torch.ones(t.shape)
        else:
            fan_in = max(1, math.prod(t.shape[1:]) if t.ndim > 1 else t.shape[0])
            value = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
        out[name] = value.to(dtype).contiguous()
    return out


def write_models(models: Path) -> list[str]:
    """Write the test models (once; reused while MODELS_VERSION matches). Returns their paths, relative."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5EncoderModel, Wav2Vec2Model

    from fantasytalking_core.audio.wav2vec2 import bundled_wav2vec2_config
    from fantasytalking_core.model.transformer import resolve_config

    marker = models / ".fantasytalking-test-models"
    files = {
        "dit_fp16": models / "diffusion_models" / "wan2.1_i2v_720p_14B_fp16.safetensors",
        "dit_fp8": models / "diffusion_models" / "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors",
        "dit_config": models / "diffusion_models" / "config.json",
        "adapter_st": models / "diffusion_models" / "fantasytalking_fp16.safetensors",
        "adapter_ckpt": models / "fantasytalking" / "fantasytalking_model.ckpt",
        "text": models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "clip": models / "clip_vision" / "clip_vision_h.safetensors",
        "vae": models / "vae" / "wan_2.1_vae.safetensors",
        "wav2vec2": models / "audio_encoders" / "wav2vec2-base-960h.safetensors",
        "wav2vec2_hf": models / "transformers" / "facebook" / "wav2vec2-base-960h" / "model.safetensors",
        "lora": models / "loras" / "wan_lora.safetensors",  # for the native workflow's (bypassed) LoRA loader
    }
    listing = sorted(str(p.relative_to(models)) for p in files.values())
    if marker.is_file() and marker.read_text() == MODELS_VERSION and all(p.is_file() for p in files.values()):
        return listing
    if models.is_dir():  # another version's files (e.g. older names) would show up in the dropdowns: start empty
        shutil.rmtree(models)
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    # DiT: the fixture's tiny Wan2.1-I2V (Wan key names) with text/image embeddings as wide as T5-base and ViT-L
    dit = load_file(FIXTURES / "dit" / "dit.safetensors")
    dim = dit["patch_embedding.weight"].shape[0]
    dit["text_embedding.0.weight"] = torch.randn(dim, TEXT_WIDTH, generator=g) / TEXT_WIDTH**0.5
    dit["img_emb.proj.0.weight"], dit["img_emb.proj.0.bias"] = torch.ones(IMAGE_WIDTH), torch.zeros(IMAGE_WIDTH)
    dit["img_emb.proj.1.weight"] = torch.randn(IMAGE_WIDTH, IMAGE_WIDTH, generator=g) / IMAGE_WIDTH**0.5
    dit["img_emb.proj.1.bias"] = torch.zeros(IMAGE_WIDTH)
    dit["img_emb.proj.3.weight"] = torch.randn(dim, IMAGE_WIDTH, generator=g) / IMAGE_WIDTH**0.5
    config = resolve_config(FIXTURES / "dit" / "config.json") | {"text_dim": TEXT_WIDTH, "image_dim": IMAGE_WIDTH}
    files["dit_config"].write_text(json.dumps(config, indent=1))
    comfy = "model.diffusion_model."  # ComfyUI repackaged layout
    save_file({comfy + k: v.half().contiguous() for k, v in dit.items()}, files["dit_fp16"])
    fp8 = {comfy + k: v.to(torch.float8_e4m3fn if k.startswith("blocks.") and v.ndim == 2 and k.endswith("weight")
                           else torch.bfloat16).contiguous() for k, v in dit.items()}
    save_file(fp8, files["dit_fp8"])
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, dim, generator=g) / dim**0.5,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(dim, 4, generator=g) * 0.1},
              files["lora"])
    # the adapter: its safetensors repack and the official pickle, both from the fixture
    save_file({k: v.half().contiguous() for k, v in load_file(FIXTURES / "dit" / "fantasytalking.safetensors").items()},
              files["adapter_st"])
    shutil.copyfile(FIXTURES / "dit" / "fantasytalking.ckpt", files["adapter_ckpt"])

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=TEXT_WIDTH, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                                     vocab_size=32128, feed_forward_proj="relu"))
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=IMAGE_WIDTH, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"))
        wav2vec2 = Wav2Vec2Model(bundled_wav2vec2_config())
    t5_sd = random_state_dict(t5, 1, torch.float16)
    t5_sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    save_file(t5_sd, files["text"])
    clip_sd = {k: v for k, v in random_state_dict(clip, 2, torch.float16).items() if not k.endswith("position_ids")}
    save_file(clip_sd, files["clip"])
    wav2vec2_sd = random_state_dict(wav2vec2, 3, torch.float16)
    save_file(wav2vec2_sd, files["wav2vec2"])
    # the Hugging Face folder of Wav2Vec2ForCTC: config.json, prefixed keys and the CTC head
    config = json.loads((PACK_ROOT / "fantasytalking_core" / "configs" / "wav2vec2-base-960h.json").read_text())
    config.pop("feature_extractor", None)
    files["wav2vec2_hf"].with_name("config.json").write_text(json.dumps(config, indent=1))
    ctc = {"wav2vec2." + k: v for k, v in wav2vec2_sd.items()}
    ctc["lm_head.weight"] = torch.randn(config["vocab_size"], config["hidden_size"], generator=g).half()
    ctc["lm_head.bias"] = torch.zeros(config["vocab_size"]).half()
    save_file(ctc, files["wav2vec2_hf"])
    vae = torch.load(FIXTURES / "vae" / "vae.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in vae.items()}, files["vae"])
    marker.write_text(MODELS_VERSION)
    return listing


def write_inputs(folder: Path) -> dict[str, float]:
    """A drawn portrait and two voice-like recordings (44.1 kHz stereo). Returns recording durations in seconds."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (120, 160), (70, 90, 120))
    draw = ImageDraw.Draw(image)
    draw.ellipse((25, 20, 95, 115), fill=(224, 182, 150))
    draw.ellipse((42, 55, 52, 62), fill=(40, 30, 30))
    draw.ellipse((68, 55, 78, 62), fill=(40, 30, 30))
    draw.ellipse((48, 85, 72, 95), fill=(150, 60, 60))
    draw.rectangle((20, 115, 100, 160), fill=(50, 50, 70))
    image.save(folder / "portrait.png")
    # a real photograph with a face (scikit-image's astronaut, public domain) for the face-crop workflow
    from skimage import data

    Image.fromarray(data.astronaut()).save(folder / "group_photo.png")
    durations = {"voice.wav": 3.0, "long_recording.wav": 14.0}
    rate = 44100
    for name, seconds in durations.items():
        t = np.arange(int(seconds * rate)) / rate
        f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        syllables = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
        mono = 0.25 * voiced * syllables
        stereo = np.stack([mono, 0.8 * mono], axis=1)
        with wave.open(str(folder / name), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes((stereo * 32767).astype("<i2").tobytes())
    return durations


# ---- ComfyUI process and HTTP/websocket clients ---------------------------------------------------------------------


def find_python(tree: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in (tree / "venv", tree / ".venv", tree.parent / "venv", tree.parent / ".venv"):
        if (venv / "bin" / "python").is_file():
            return str(venv / "bin" / "python")
    return sys.executable


def python_value(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def install_requirements(python: str, workdir: Path) -> tuple[str, str]:
    """pip install -r requirements.txt into ComfyUI's Python, torch pinned, then the optional ``ray`` (the
    sampler's Ray workers are checked too); (torch before, torch after)."""
    before = python_value(python, "import torch; print(torch.__version__)")
    constraints = workdir / "constraints.txt"
    constraints.write_text(f"torch=={before}\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                    str(PACK_ROOT / "requirements.txt"), "-c", str(constraints)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "ray>=2.40", "-c",
                    str(constraints)], check=True)
    return before, python_value(python, "import torch; print(torch.__version__)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyUI:
    """A ComfyUI server started from ``tree`` on ``base`` (its models, custom_nodes, input, output, user)."""

    def __init__(self, tree: Path, python: str, base: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
                "--disable-auto-launch", "--disable-api-nodes", *os.environ.get("COMFYUI_ARGS", "").split()]
        if "--database-url" in (tree / "comfy" / "cli_args.py").read_text():  # else the tree's own user/comfyui.db
            args += ["--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
        if "--cpu" not in args and python_value(python, "import torch; print(torch.cuda.is_available())") != "True":
            args.append("--cpu")
        self.log_file = open(log, "w")
        self.process = subprocess.Popen(args, cwd=tree, stdout=self.log_file, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while True:
            try:
                self.get("/system_stats")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() - started > 600:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not come up; last log lines:\n{self.log_tail()}") from None
                time.sleep(1)
        self.boot_s = time.monotonic() - started

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read()
                return r.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


class WebSocket:
    """A minimal RFC 6455 client (stdlib only): text frames out, frames in."""

    def __init__(self, port: int, path: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=None)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"websocket refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, payload: bytes, opcode: int = 1) -> None:
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16
                                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)  # client frames are masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def recv(self) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); answers pings itself."""
        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            if b1 & 0x0F == 9:
                self.send(payload, opcode=10)
                continue
            return b1 & 0x0F, payload

    def close(self) -> None:
        self.sock.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, url: str, size: tuple[int, int]):
        port = free_port()
        self.process = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--remote-debugging-port={port}",
             f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(150):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                break
            except OSError:
                time.sleep(0.2)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = WebSocket(port, page["webSocketDebuggerUrl"].split(str(port), 1)[1])
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        for _ in range(120):
            time.sleep(0.5)
            if self.js("!!(window.app && window.app.graph && window.app.vueAppReady)"):
                return
        raise RuntimeError("the ComfyUI front end did not start")

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}).encode())
        while True:
            opcode, payload = self.ws.recv()
            message = json.loads(payload) if opcode == 1 else {}
            if message.get("id") == i:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


class Events:
    """ComfyUI's websocket messages (the JSON ones), collected by a thread."""

    def __init__(self, port: int, client_id: str):
        self.messages: list[dict] = []
        self.ws = WebSocket(port, f"/ws?clientId={client_id}")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                opcode, payload = self.ws.recv()
                if opcode == 1:
                    self.messages.append(json.loads(payload))
                elif opcode == 8:
                    return
        except (OSError, ConnectionError, ValueError):
            return

    def of(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        return [m["data"] for m in list(self.messages)
                if m.get("type") == kind and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)]

    def close(self) -> None:
        self.ws.close()


# ---- checks ----------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            self.lines.append(f"  FAIL {what}")
        return ok

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def check_object_info(comfy: ComfyUI, report: Report, model_files: list[str]) -> None:
    log = comfy.log.read_text(errors="replace")
    failed = [line for line in log.splitlines() if PACK_LINK in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    report.check(not failed, f"pack imported without failure ({failed[:1]})")
    info = comfy.get("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    ours = sorted(n for n in info if n.startswith("FantasyTalking"))
    report.check(not missing, f"every node listed in /object_info (missing: {missing})")
    untipped = [f"{n}.{name}" for n in ours for group in ("required", "optional")
                for name, spec in info[n]["input"].get(group, {}).items()
                if len(spec) < 2 or not spec[1].get("tooltip")]
    report.check(not untipped, f"a tooltip on every input (missing on {untipped})")
    wrong_category = [n for n in ours if info[n]["category"] != "FantasyTalking"]
    report.check(not wrong_category, f"category FantasyTalking ({wrong_category})")
    loader = info["FantasyTalkingModelLoader"]["input"]["required"]
    dits, adapters = loader["model_name"][1]["options"], loader["adapter_name"][1]["options"]
    wav2vec2 = info["FantasyTalkingWav2Vec2Loader"]["input"]["required"]["model_name"][1]["options"]
    report.check(sorted(dits) == ["wan2.1_i2v_720p_14B_fp16.safetensors", "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors"],
                 f"DiT dropdown lists both DiT files and no adapter/config ({dits})")
    report.check(adapters == ["fantasytalking_model.ckpt", "fantasytalking_fp16.safetensors"],
                 f"adapter dropdown lists models/fantasytalking then diffusion_models ({adapters})")
    report.check(wav2vec2 == ["wav2vec2-base-960h.safetensors", "transformers/facebook/wav2vec2-base-960h"],
                 f"wav2vec2 dropdown lists audio_encoders then Hugging Face folders ({wav2vec2})")
    report.say(f"nodes: {len(ours)} in /object_info ({', '.join(ours)}); every input has a tooltip: "
               f"{'yes' if not untipped else 'NO'}; import failures: {len(failed)}")
    report.say(f"dropdowns: DiT {dits}; adapter {adapters}; wav2vec2 {wav2vec2}")
    report.say(f"test models ({len(model_files)} files, real formats): {', '.join(model_files)}")


def load_api_workflow(path: Path) -> dict:
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        node["inputs"].update(SPEED_OVERRIDES.get(node["class_type"], {}))
    return prompt


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = [(k, v) for k, v in prompt.items() if v["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"expected one {class_type} node, found {len(found)}")
    return found[0]


def submit(comfy: ComfyUI, prompt: dict, client_id: str) -> tuple[int, dict]:
    return comfy.post("/prompt", {"prompt": prompt, "client_id": client_id})


def wait_history(comfy: ComfyUI, prompt_id: str, timeout: float = 900) -> dict:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        history = comfy.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            if history[prompt_id]["status"].get("status_str") in ("success", "error"):
                return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def saved_files(outputs: dict) -> list[dict]:
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "filename" in value:
                found.append(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(outputs)
    return found


def probe_mp4(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        info = {"codec": video.codec_context.name, "width": video.codec_context.width,
                "height": video.codec_context.height, "fps": float(video.average_rate),
                "audio_codec": audio.codec_context.name if audio else None,
                "audio_rate": audio.codec_context.sample_rate if audio else None,
                "audio_channels": audio.codec_context.channels if audio else None}
    with av.open(str(path)) as container:
        info["frames"] = sum(1 for _ in container.decode(video=0))
    if audio is not None:
        with av.open(str(path)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
        info["audio_s"] = samples / info["audio_rate"]
    return info


def expected_frames(seconds: float, fps: float, max_frames: int) -> int:
    from fantasytalking_core.audio.rules import frames_for_duration

    return frames_for_duration(seconds, fps, max_frames)


def sampler_segments(sampler: dict, frames: int) -> int:
    """Segments the sampler node makes of ``frames`` frames (the library's rule, the node's inputs)."""
    from fantasytalking_core.audio.timeline import segment_spans

    inputs = sampler["inputs"]
    overlap = 1 if inputs.get("chaining", "last_frame") == "last_frame" else inputs.get("motion_frames", 9)
    return len(segment_spans(frames, inputs.get("segment_frames", 81), overlap))


def check_paste_back_refuses_previews(comfy: ComfyUI, path: Path, output: Path, report: Report) -> None:
    """Past max_image_frames the sampler's IMAGE output is 16 preview frames of the file it wrote: Face Paste Back
    must refuse them in one line (it pasted them back and Save Video kept a 16-frame clip), and the file must have
    the face pasted back into the full portrait (Identity Encode has the crop info), or be the crop with the
    sampler's paste_face_back off."""
    import av
    import numpy as np
    from PIL import Image

    for paste in (True, False):
        prompt = load_api_workflow(path)
        sampler_id, sampler = node_of(prompt, "FantasyTalkingSampler")
        sampler["inputs"].update(max_image_frames=0, paste_face_back=paste)
        name = f"{path.stem} max_image_frames=0 paste_face_back={paste}"
        status, reply = submit(comfy, prompt, f"fantasytalking-preview-paste-{paste}")
        if not report.check(status == 200, f"{name}: /prompt accepted it ({status})"):
            return
        entry = wait_history(comfy, reply["prompt_id"])
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        message = errors[0].get("exception_message", "") if errors else ""
        what = f"{name}: Face Paste Back refuses the preview frames ({message[:300]!r})"
        said = "pasted back already" if paste else "without the paste-back"
        if report.check(entry["status"]["status_str"] == "error" and errors and said in message
                        and errors[0].get("node_type") == "FantasyTalkingFacePasteBack", what):
            report.say(what)
        _, loader = node_of(prompt, "LoadImage")
        portrait = np.asarray(Image.open(output.parent / "input" / loader["inputs"]["image"]).convert("RGB"))
        written = [f for f in saved_files(entry["outputs"].get(sampler_id, {})) if f["filename"].endswith(".mp4")]
        if not report.check(len(written) == 1, f"{name}: the sampler wrote one mp4 ({written})"):
            return
        with av.open(str(output / written[0].get("subfolder", "") / written[0]["filename"])) as container:
            first = next(container.decode(video=0)).to_ndarray(format="rgb24")
        # the bottom-right corner lies outside the face square: the portrait itself there once pasted back, else
        # the generated crop (the tiny random model's noise)
        height, width = portrait.shape[:2]
        corner = float(np.abs(first[-48:, -48:].astype(float) - portrait[height - 48:, width - 48:]).mean())
        shown = " ".join(entry["outputs"].get(sampler_id, {}).get("text", ["?"]))  # the node's status text
        said = f"the face pasted back into the {width}x{height} portrait" in shown
        if paste:  # the portrait's size, odd sides padded to even (H.264 in yuv420p)
            ok = first.shape[:2] == (height + height % 2, width + width % 2) and corner < 12 and said
        else:
            ok = corner > 30 and not said
        what = (f"{name}: the sampler's file is {'the portrait with the face pasted back' if paste else 'the crop'} "
                f"(frame {first.shape[1]}x{first.shape[0]}; mean difference from the portrait in a corner outside "
                f"the face: {corner:.1f} of 255; the node says {shown.splitlines()[-1]!r})")
        if report.check(ok, what):
            report.say(what)


def run_workflow(comfy: ComfyUI, path: Path, output: Path, durations: dict, report: Report,
                 overrides: dict | None = None) -> None:
    """Run one workflow (with ``overrides`` on the sampler's inputs) and check every mp4 it saved: the Save Video
    file, and the sampler's own file when the video was longer than its max_image_frames."""
    prompt = load_api_workflow(path)
    sampler_id, sampler = node_of(prompt, "FantasyTalkingSampler")
    sampler["inputs"].update(overrides or {})
    name = path.stem + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    audio_id, audio = node_of(prompt, "FantasyTalkingAudioEncode")
    _, loader = node_of(prompt, "LoadAudio")
    frames_wanted = expected_frames(durations[loader["inputs"]["audio"]], audio["inputs"]["fps"],
                                    audio["inputs"]["max_frames"])
    client = f"fantasytalking-{path.stem}{'-' + str(len(overrides)) if overrides else ''}"
    events = Events(comfy.port, client)
    started = time.monotonic()
    status, reply = submit(comfy, prompt, client)
    if not report.check(status == 200, f"{name}: /prompt accepted it ({status} {json.dumps(reply)[:600]})"):
        events.close()
        return
    entry = wait_history(comfy, reply["prompt_id"])
    seconds = time.monotonic() - started
    time.sleep(0.5)  # let the last websocket messages arrive
    events.close()
    ok = entry["status"]["status_str"] == "success"
    if not report.check(ok, f"{name}: ran to success ({json.dumps(entry['status'].get('messages', []))[-1500:]})"):
        return
    videos = [f for f in saved_files(entry["outputs"]) if f["filename"].endswith(".mp4")]
    to_file = frames_wanted > sampler["inputs"].get("max_image_frames", 1500)
    wanted = 2 if to_file else 1  # the sampler's own mp4 too, past max_image_frames
    if not report.check(len(videos) == wanted, f"{name}: {wanted} mp4 saved ({videos})"):
        return
    for video in videos[1:]:
        check_mp4(name, output / video.get("subfolder", "") / video["filename"], prompt, frames_wanted, durations,
                  report, to_file)
    mp4 = output / videos[0].get("subfolder", "") / videos[0]["filename"]
    info = check_mp4(name, mp4, prompt, frames_wanted, durations, report, to_file)
    steps = sampler["inputs"]["steps"] * sampler_segments(sampler, frames_wanted)
    progress = [(p["value"], p["max"]) for p in events.of("progress", reply["prompt_id"]) if p.get("node") == sampler_id]
    text = entry["outputs"].get(audio_id, {}).get("text", ["?"])[0]
    report.check(bool(progress) and progress[-1] == (steps, steps) and progress[0][0] >= 1,
                 f"{name}: sampler progress reaches {steps}/{steps} ({progress[-3:]})")
    fps, recording = float(audio["inputs"]["fps"]), durations[loader["inputs"]["audio"]]
    report.say(f"workflow {name}: success in {seconds:.1f} s -> {[v['filename'] for v in videos]}: {info['frames']} "
               f"frames {info['width']}x{info['height']} @ {info['fps']:g} fps {info['codec']}, audio "
               f"{info['audio_codec']} {info['audio_rate']} Hz {info['audio_channels']} ch {info.get('audio_s', 0):.2f} s "
               f"(recording {recording:.2f} s, video {info['frames'] / fps:.2f} s, "
               f"{sampler_segments(sampler, frames_wanted)} segment(s)); audio encode says \"{text}\"")


def check_mp4(name: str, mp4: Path, prompt: dict, frames_wanted: int, durations: dict, report: Report,
              padded: bool = False) -> dict:
    """Frame count, rate, AAC audio as long as the video (or the recording, shorter by up to 5 frames, unless the
    library's writer ``padded`` it with silence to the video), the paste-back size of one mp4."""
    _, audio = node_of(prompt, "FantasyTalkingAudioEncode")
    _, loader = node_of(prompt, "LoadAudio")
    info = probe_mp4(mp4)
    name = f"{name} ({mp4.name})"
    fps = float(audio["inputs"]["fps"])
    recording = durations[loader["inputs"]["audio"]]
    audio_wanted = frames_wanted / fps if padded else min(recording, frames_wanted / fps)
    report.check(info["frames"] == frames_wanted, f"{name}: {frames_wanted} frames in the mp4 (found {info['frames']})")
    report.check(abs(info["fps"] - fps) < 1e-3, f"{name}: {fps} fps (found {info['fps']})")
    report.check(info["audio_codec"] == "aac", f"{name}: an AAC audio stream (found {info['audio_codec']})")
    report.check(abs(info.get("audio_s", 0) - audio_wanted) < 0.05,
                 f"{name}: audio {audio_wanted:.2f} s long (found {info.get('audio_s', 0):.2f} s)")
    if any(n["class_type"] == "FantasyTalkingFacePasteBack" for n in prompt.values()):
        report.check((info["width"], info["height"]) == (512, 512),
                     f"{name}: pasted back at the photo's full 512x512 size (found {info['width']}x{info['height']})")
    return info


LORA_FITS, LORA_FOREIGN = "tiny_style_lora.safetensors", "wan14b_style_lora.safetensors"


def write_loras(loras: Path) -> None:
    """A kijai-format LoRA made for the test DiT's sizes, and one made for the 14B model's (5120 wide)."""
    import torch
    from safetensors.torch import save_file
    from test_loaders_lora import kijai_lora

    loras.mkdir(parents=True, exist_ok=True)
    kijai_lora(loras / LORA_FITS)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}, loras / LORA_FOREIGN)


def decoded_frames(path: Path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)


def check_lora(comfy: ComfyUI, path: Path, output: Path, report: Report) -> None:
    """FantasyTalking LoRA between the loader and the sampler: the video changes against the same graph without
    it (already run), and a LoRA for another model stops the run with the message naming it."""
    plain = sorted(output.rglob(f"{path.stem}_*.mp4"))  # the run of the same graph without the LoRA
    results = {}
    for lora in (LORA_FITS, LORA_FOREIGN):
        prompt = load_api_workflow(path)
        loader_id, _ = node_of(prompt, "FantasyTalkingModelLoader")
        _, sampler = node_of(prompt, "FantasyTalkingSampler")
        prompt["900"] = {"class_type": "FantasyTalkingLoraLoader",
                         "inputs": {"model": [loader_id, 0], "lora_name": lora, "strength": 1.5}}
        sampler["inputs"]["model"] = ["900", 0]
        status, reply = submit(comfy, prompt, f"fantasytalking-lora-{lora}")
        if not report.check(status == 200, f"LoRA {lora}: /prompt accepted it ({status} {json.dumps(reply)[:400]})"):
            return
        results[lora] = wait_history(comfy, reply["prompt_id"])
    entry = results[LORA_FITS]
    videos = [f for f in saved_files(entry["outputs"]) if f["filename"].endswith(".mp4")]
    if report.check(entry["status"]["status_str"] == "success" and len(videos) == 1 and plain,
                    f"LoRA {LORA_FITS}: ran to an mp4 ({json.dumps(entry['status'].get('messages', []))[-600:]})"):
        with_lora = decoded_frames(output / videos[0].get("subfolder", "") / videos[0]["filename"])
        without = decoded_frames(plain[0])
        change = float(abs(with_lora - without).mean()) if with_lora.shape == without.shape else float("nan")
        report.check(change > 1.0, f"LoRA {LORA_FITS} at 1.5 changes the video: mean |difference| {change:.1f} "
                                   "of 255 against the same graph without it")
        report.say(f"FantasyTalking LoRA: {LORA_FITS} at strength 1.5 changes the video by {change:.1f} of 255 "
                   "(mean per pixel) against the same graph without it")
    messages = json.dumps(results[LORA_FOREIGN]["status"].get("messages", []))
    if report.check(results[LORA_FOREIGN]["status"]["status_str"] == "error" and "match no layer" in messages,
                    f"LoRA {LORA_FOREIGN}: refused with a message naming it ({messages[-400:]})"):
        report.say(f"FantasyTalking LoRA: {LORA_FOREIGN} (made for the 14B model) stops the run: "
                   + next((m[1].get("exception_message", "") for m in results[LORA_FOREIGN]["status"]["messages"]
                           if m[0] == "execution_error"), "?")[:160])


def check_parallel(comfy: ComfyUI, path: Path, output: Path, durations: dict, report: Report) -> None:
    """The sampler's ``parallel`` input: cfg=2 runs the guidance passes in two worker processes (gloo on this CPU),
    each loading the model from its files, and makes the video of the same graph without it (already run) to the
    mp4's rounding, with progress on the node; a malformed layout is refused before the run and one this machine
    cannot run stops the run with its one-line reason."""
    runs = sorted(output.rglob(f"{path.stem}_*.mp4"))
    if not report.check(bool(runs), f"parallel: the plain run of {path.stem} is there to compare with"):
        return
    variants = [("processes", {}), ("ray", {}), ("processes", {"offload_blocks": True})]  # the last: blocks stream
    for workers, extra in variants:
        name = f"parallel cfg=2 ({workers}{', offload_blocks' if extra else ''})"
        before = set(output.rglob(f"{path.stem}_*.mp4"))
        run_workflow(comfy, path, output, durations, report,
                     {"parallel": "cfg=2", "parallel_workers": workers, **extra})
        new = sorted(set(output.rglob(f"{path.stem}_*.mp4")) - before)
        if not report.check(len(new) == 1, f"{name}: one new mp4 ({new})"):
            continue
        ours, plain = decoded_frames(new[0]), decoded_frames(runs[0])
        change = float(abs(ours - plain).mean()) if ours.shape == plain.shape else float("nan")
        # float32 results equal to 1e-4 (tests/test_nodes_convert.py); 8-bit rounding and the codec may move a
        # few pixels by a step, far below what any change of the graph does (the LoRA: about 20 of 255)
        report.check(change <= 0.5, f"{name}: the same video as one process (mean |difference| {change:.3f} of 255)")
        report.say(f"{name}, two workers: mean |difference| {change:.3f} of 255 per pixel against the same graph in "
                   "one process")
    prompt = load_api_workflow(path)
    _, sampler = node_of(prompt, "FantasyTalkingSampler")
    sampler["inputs"]["parallel"] = "cfg=two"
    status, reply = submit(comfy, prompt, "fantasytalking-parallel-form")
    report.check(status == 400 and "cfg needs a whole number of processes" in json.dumps(reply),
                 f"parallel 'cfg=two' refused before the run ({status} {json.dumps(reply)[:400]})")
    sampler["inputs"]["parallel"] = "ulysses=2"
    status, reply = submit(comfy, prompt, "fantasytalking-parallel-cpu")
    entry = wait_history(comfy, reply["prompt_id"]) if status == 200 else {"status": {}}
    messages = json.dumps(entry["status"].get("messages", []))
    if report.check(entry["status"].get("status_str") == "error" and "on the CPU use cfg=N alone" in messages,
                    f"parallel ulysses=2 on a CPU: stopped with its reason ({messages[-400:]})"):
        report.say("parallel: 'cfg=two' refused by validation (HTTP 400); ulysses=2 on this CPU stops the run: "
                   + next((m[1].get("exception_message", "") for m in entry["status"]["messages"]
                           if m[0] == "execution_error"), "?")[:200])
    sampler["inputs"].update(parallel="cfg=2", gpu_memory_gb=0.5)  # less than even streaming needs
    status, reply = submit(comfy, prompt, "fantasytalking-parallel-budget")
    entry = wait_history(comfy, reply["prompt_id"]) if status == 200 else {"status": {}}
    messages = json.dumps(entry["status"].get("messages", []))
    report.check(entry["status"].get("status_str") == "error" and "more than the 0.5 GiB budget" in messages
                 and "Traceback" not in messages,
                 f"parallel cfg=2 with a 0.5 GB budget: stopped with its reason ({messages[-400:]})")


def check_refused_before_the_run(comfy: ComfyUI, path: Path, report: Report) -> None:
    """Inputs no run can use are refused by validation (HTTP 400, before any model loads), in one line that names
    the input; an input fed by a link is checked when its node runs, in one line as well."""
    def node_error(reply: dict) -> str:
        return next((e["details"] for n in reply.get("node_errors", {}).values() for e in n["errors"]), "?")

    prompt = load_api_workflow(path)
    _, loader = node_of(prompt, "FantasyTalkingModelLoader")
    loader["inputs"]["model_name"] = "absent_model.safetensors"
    status, reply = submit(comfy, prompt, "fantasytalking-validate")
    text = json.dumps(reply)
    ok = status == 400 and "not in models/diffusion_models" in text
    report.check(ok, f"missing model refused before the run ({status} {text[:400]})")
    report.say(f"validate_inputs: a missing model_name is refused before the run: HTTP {status}, "
               f"\"{node_error(reply)}\"")
    for inputs, words in (({"audio_guidance_start": 0.8, "audio_guidance_end": 0.2}, "0 <= start <= end <= 1"),
                          ({"attention": "flash"}, "attention 'flash' needs the flash-attn package"),
                          ({"filename_prefix": "../../elsewhere/long", "max_image_frames": 0},
                           "leads outside ComfyUI's output folder")):
        prompt = load_api_workflow(path)
        _, sampler = node_of(prompt, "FantasyTalkingSampler")
        sampler["inputs"].update(inputs)
        status, reply = submit(comfy, prompt, "fantasytalking-validate")
        report.check(status == 400 and words in node_error(reply) and "Traceback" not in json.dumps(reply),
                     f"sampler {inputs} refused before the run ({status} {node_error(reply)[:300]})")
    report.say("validate_inputs: a reversed audio guidance range, an uninstalled attention kernel and a "
               "filename_prefix outside the output folder (every video written to a file) are refused before the "
               "run (HTTP 400)")
    prompt = load_api_workflow(path)  # segment_frames fed by a link: unknown at validation, refused when it runs
    sampler_id, sampler = node_of(prompt, "FantasyTalkingSampler")
    prompt["linked_int"] = {"class_type": "PrimitiveInt", "inputs": {"value": 80}}
    sampler["inputs"]["segment_frames"] = ["linked_int", 0]
    status, reply = submit(comfy, prompt, "fantasytalking-linked")
    entry = wait_history(comfy, reply["prompt_id"]) if status == 200 else {"status": {}}
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    message = errors[0].get("exception_message", "") if errors else json.dumps(reply)[:300]
    report.check(status == 200 and len(errors) == 1 and errors[0].get("node_id") == sampler_id
                 and "segment_frames must be 4n+1" in message and "\n" not in message.strip(),
                 f"segment_frames 80 fed by a link: validated, then refused by the sampler in one line ({message})")
    report.say(f"a widget fed by a link (segment_frames 80 from an Int node) passes validation and the sampler "
               f"refuses it when it runs: \"{message.strip()[:160]}\"")


def pool_workers(pid: int) -> list[int]:
    """Process ids of the sampler's pool workers: the server's children that multiprocessing's spawn started."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    workers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except OSError:  # it ended meanwhile
            pass
    return workers


def check_free_closes_workers(comfy: ComfyUI, report: Report) -> None:
    """ComfyUI's "Free model and node cache" (POST /free) drops the loaded model; the pool's workers, which hold
    copies of it (on their GPUs), stop with it."""
    before = pool_workers(comfy.process.pid)
    if not report.check(len(before) == 2, f"parallel: the 2 pool workers are alive after a parallel run ({before})"):
        return
    status, _ = comfy.post("/free", {"unload_models": True, "free_memory": True})
    deadline = time.monotonic() + 90
    while pool_workers(comfy.process.pid) and time.monotonic() < deadline:
        time.sleep(1)
    left = pool_workers(comfy.process.pid)
    if report.check(status == 200 and not left,
                    f"'Free model and node cache' (/free) stops the pool's workers ({status}; left: {left})"):
        report.say(f"/free (unload models, free memory): the 2 pool workers {before} stopped with the model")


def check_interrupt(comfy: ComfyUI, path: Path, report: Report, overrides: dict | None = None) -> None:
    """/interrupt after the sampler's first step stops it there (with ``overrides``, e.g. a parallel layout whose
    worker processes must stop too); the server answers afterwards."""
    prompt = load_api_workflow(path)
    sampler_id, sampler = node_of(prompt, "FantasyTalkingSampler")
    sampler["inputs"].update(steps=INTERRUPT_STEPS, seed=sampler["inputs"]["seed"] + 1, **(overrides or {}))
    client = "fantasytalking-interrupt" + "".join(f"-{v}" for v in (overrides or {}).values())
    name = "interrupt" + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    events = Events(comfy.port, client)
    status, reply = submit(comfy, prompt, client)
    if not report.check(status == 200, f"interrupt run accepted ({status} {reply})"):
        return
    prompt_id = reply["prompt_id"]
    started = time.monotonic()
    while not [p for p in events.of("progress", prompt_id) if p.get("node") == sampler_id]:
        if time.monotonic() - started > 600:
            break
        time.sleep(0.05)
    comfy.post("/interrupt", {})
    entry = wait_history(comfy, prompt_id)
    time.sleep(0.5)
    events.close()
    last = max((p["value"] for p in events.of("progress", prompt_id) if p.get("node") == sampler_id), default=0)
    interrupted = bool(events.of("execution_interrupted", prompt_id))
    report.check(interrupted and entry["status"]["status_str"] == "error" and last < INTERRUPT_STEPS,
                 f"{name} stops the sampler between steps (interrupted={interrupted}, last step {last}/{INTERRUPT_STEPS})")
    report.check("system" in comfy.get("/system_stats"), f"server answers after the {name}")
    report.say(f"{name}: /interrupt after the first progress message stopped the sampler at step {last}/{INTERRUPT_STEPS} "
               f"(execution_interrupted: {interrupted}); server still answers")


STATUS_RUN = """(async (api) => {
  app.graph.clear();
  await app.loadApiJson(api, "status-check");
  await app.queuePrompt(0, 1);
  return true;
})"""
STATUS_READ = """((ids) => Object.fromEntries(ids.map(id => {
  const node = app.graph.getNodeById(Number(id));
  const w = node && (node.widgets || []).find(w => w.name === "fantasytalking_status");
  return [id, w ? String(w.value) : null];
})))"""
STATUS_SENT = """(async (ids) => {
  const prompt = (await app.graphToPrompt()).output;  // what the next Run would send
  return ids.filter(id => prompt[id] && "fantasytalking_status" in prompt[id].inputs);
})"""
STATUS_SHOWN = """((ids) => ids.every(id => {
  const node = app.graph.getNodeById(Number(id));
  const w = node && (node.widgets || []).find(w => w.name === "fantasytalking_status");
  const el = w && w.inputEl;  // the DOM text box the user sees
  if (!el) return false;
  const box = el.getBoundingClientRect();
  return el.value.length > 0 && box.width > 20 && box.height > 10 && getComputedStyle(el).display !== "none";
}))"""


def check_status_on_nodes(comfy: ComfyUI, path: Path, workdir: Path, report: Report) -> None:
    """Run a workflow from the real front end (headless Chromium) and check that each node's status text (the
    frame count, the face status, what the sampler made and where its model computed) is drawn on the node, then
    keep a screenshot."""
    prompt = load_api_workflow(path)
    watched = {node_id: node["class_type"] for node_id, node in prompt.items()
               if node["class_type"] in ("FantasyTalkingAudioEncode", "FantasyTalkingIdentityEncode",
                                         "FantasyTalkingSampler")}
    for node in prompt.values():  # inputs no earlier run used, so these nodes run (a cached node sends no text)
        if node["class_type"] == "FantasyTalkingAudioEncode":
            node["inputs"]["max_frames"] = 77
        if node["class_type"] == "FantasyTalkingIdentityEncode":
            node["inputs"]["image_size"] = 80
    browser = Browser(comfy.url, (1600, 1000))
    try:
        browser.js(f"{STATUS_RUN}({json.dumps(prompt)})")
        started, values = time.monotonic(), {}
        while time.monotonic() - started < 600:
            values = browser.js(f"{STATUS_READ}({json.dumps(list(watched))})")
            if all(values.values()):
                break
            time.sleep(1)
        time.sleep(1)  # let the canvas draw
        shown = browser.js(f"{STATUS_SHOWN}({json.dumps(list(watched))})")
        sent = browser.js(f"{STATUS_SENT}({json.dumps(list(watched))})")
        browser.js("app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true)")
        time.sleep(0.5)
        picture = workdir / "node_status.png"
        picture.write_bytes(browser.screenshot())
    finally:
        browser.close()
    audio_id = next(k for k, v in watched.items() if v == "FantasyTalkingAudioEncode")
    identity_id = next(k for k, v in watched.items() if v == "FantasyTalkingIdentityEncode")
    report.check("frames = " in (values.get(audio_id) or ""),
                 f"{path.stem} from the front end: Audio Encode shows its frame count on the node ({values.get(audio_id)!r})")
    report.check("video frames" in (values.get(identity_id) or ""),
                 f"{path.stem} from the front end: Identity Encode shows its face status ({values.get(identity_id)!r})")
    sampler_id = next(k for k, v in watched.items() if v == "FantasyTalkingSampler")
    report.check("steps each; model whole on cpu" in (values.get(sampler_id) or ""),
                 f"{path.stem} from the front end: the Sampler shows what it made and where "
                 f"({values.get(sampler_id)!r})")
    report.check(bool(shown), "the status text boxes are visible in the page (in the DOM, with a size)")
    report.check(sent == [], f"the status texts are not sent with the next prompt (they would change the nodes' "
                             f"cache keys and run them again): sent by {sent}")
    report.say(f"node status in the front end: {values}; screenshot {picture}")


def check_native_workflow_validates(comfy: ComfyUI, path: Path, report: Report) -> None:
    """The native route's workflow passes the server's validation (every node type, input and link). It is not run
    to the end: ComfyUI's Wan model needs umT5-XXL's 4096-wide text features, and a test text encoder that wide is
    several GB; tests/comfyui_native_check.py proves the numbers in-process instead."""
    status, reply = submit(comfy, load_api_workflow(path), f"fantasytalking-{path.stem}")
    ok = status == 200 and not reply.get("node_errors")
    report.check(ok, f"{path.stem}: the server validates the native workflow ({status} {json.dumps(reply)[:600]})")
    if status == 200:
        comfy.post("/interrupt", {})
        wait_history(comfy, reply["prompt_id"])  # it stops at the tiny DiT ComfyUI cannot size (heads = width / 128)
    report.say(f"workflow {path.stem}: validated by the server (HTTP {status}); not run: see "
               "tests/comfyui_native_check.py")


def check_native_route(tree: Path, python: str, report: Report) -> None:
    """tests/comfyui_native_check.py with ComfyUI's Python: the native route's numbers against the engine."""
    env = {**os.environ, "COMFYUI_PATH": str(tree)}
    result = subprocess.run([python, str(PACK_ROOT / "tests" / "comfyui_native_check.py")], env=env,
                            capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    failed = [line for line in lines if line.startswith("FAIL")]
    report.check(result.returncode == 0 and lines and not failed,
                 f"native route: {len(lines)} checks in-process ({failed or result.stderr[-1500:]})")
    for line in lines:
        report.say(f"native route: {line}")


FULL_SIZE_RAM = 24e9  # bytes: the conditioning check's library side holds umT5-XXL in float32 (21 GiB)


def check_conditioning(tree: Path, python: str, workdir: Path, report: Report) -> None:
    """tests/comfyui_conditioning_check.py, its three phases with ComfyUI's Python: the Text Encode and Identity
    Encode nodes on full-size random umT5-XXL and ViT-H/14 files, loaded by ComfyUI's own loaders, against the
    library. Run after the server has stopped: one side holds 11-21 GB."""
    if os.environ.get("COMFYUI_SKIP_FULL_SIZE") == "1":
        report.say("conditioning check: not run (COMFYUI_SKIP_FULL_SIZE=1)")
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not report.check(ram >= FULL_SIZE_RAM, f"conditioning check: needs {FULL_SIZE_RAM / 1e9:g} GB of RAM, this "
                                              f"machine has {ram / 1e9:.1f} (set COMFYUI_SKIP_FULL_SIZE=1 to leave "
                                              "it out knowingly)"):
        return
    script, folder = str(PACK_ROOT / "tests" / "comfyui_conditioning_check.py"), str(workdir / "full_size")
    env = {**os.environ, "COMFYUI_PATH": str(tree)}
    lines, failed = [], []
    for phase in ("write", "comfy", "library"):
        result = subprocess.run([python, script, phase, folder], env=env, capture_output=True, text=True,
                                timeout=3600)
        lines += [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
        if result.returncode != 0:
            failed.append(f"phase {phase} exited {result.returncode}: {result.stderr[-1500:]}")
            break
    failed += [line for line in lines if line.startswith("FAIL")]
    report.check(len(lines) >= 9 and not failed,
                 f"conditioning nodes = library on full-size encoders: {len(lines)} checks ({failed or 'all ok'})")
    for line in lines:
        report.say(f"conditioning: {line}")


def work_dir() -> Path:
    return Path(os.environ.get("COMFYUI_TEST_DIR") or Path(tempfile.gettempdir()) / "fantasytalking-comfyui-test")


def make_base(workdir: Path) -> Path:
    """The ComfyUI base directory: the pack linked into custom_nodes, an empty output folder."""
    base = workdir / "base"
    for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    shutil.rmtree(base / "output")
    (base / "output").mkdir()
    return base


def main() -> int:
    tree = Path(os.environ.get("COMFYUI_PATH", "")).expanduser()
    if not (tree / "main.py").is_file():
        print("COMFYUI_PATH must point at a ComfyUI tree (the folder with main.py).", file=sys.stderr)
        return 2
    workdir = work_dir()
    base = make_base(workdir)

    report = Report()
    version_file = tree / "comfyui_version.py"
    version = re.search(r'__version__ = "([^"]+)"', version_file.read_text()).group(1) if version_file.is_file() else "?"
    python = find_python(tree)
    before, after = install_requirements(python, workdir)
    report.check(before == after, f"requirements.txt leaves torch alone ({before} -> {after})")
    report.say(f"ComfyUI {version} at {tree}, Python {python}; pip install -r requirements.txt: torch {before} -> {after}")
    model_files = write_models(base / "models")
    write_loras(base / "models" / "loras")
    durations = write_inputs(base / "input")

    comfy = ComfyUI(tree, python, base, workdir / "comfyui.log")
    try:
        report.say(f"ComfyUI up in {comfy.boot_s:.1f} s on {comfy.url} (log {comfy.log})")
        check_object_info(comfy, report, model_files)
        workflows = sorted((WORKFLOWS / "api").glob("*.json"))
        report.check(len(workflows) >= 2, f"API-format example workflows found ({[w.name for w in workflows]})")
        report.say(f"speed overrides on every workflow: {SPEED_OVERRIDES}")
        if workflows:
            check_refused_before_the_run(comfy, workflows[0], report)
        for path in workflows:
            if "FantasyTalkingSampler" in path.read_text():
                run_workflow(comfy, path, base / "output", durations, report)
                if path.stem == "long_recording":  # the same video written by the sampler itself, streamed
                    run_workflow(comfy, path, base / "output", durations, report, {"max_image_frames": 0})
                if path.stem == "face_crop_paste_back":
                    check_paste_back_refuses_previews(comfy, path, base / "output", report)
            else:
                check_native_workflow_validates(comfy, path, report)
        check_lora(comfy, WORKFLOWS / "api" / "talking_portrait.json", base / "output", report)
        check_parallel(comfy, WORKFLOWS / "api" / "talking_portrait.json", base / "output", durations, report)
        if workflows:
            check_interrupt(comfy, workflows[0], report)
            check_interrupt(comfy, workflows[0], report, {"parallel": "cfg=2"})
            check_free_closes_workers(comfy, report)
        check_status_on_nodes(comfy, WORKFLOWS / "api" / "talking_portrait.json", workdir, report)
    finally:
        comfy.stop()
    check_native_route(tree, python, report)
    check_conditioning(tree, python, workdir, report)
    if report.failures:
        print("\nFAILED checks:\n" + "\n".join(f"- {f}" for f in report.failures), flush=True)
        print(f"\nComfyUI log: {comfy.log}\n{comfy.log_tail()}", flush=True)
        return 1
    print("RESULT: PASS (every check above passed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
