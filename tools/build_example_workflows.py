"""Build the example workflows with the real ComfyUI front end, in headless Chromium.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_example_workflows.py

For each workflow described below, the front end loads the graph (``app.loadApiJson``), the nodes are laid out
and grouped, and the front end itself writes:

- ``example_workflows/<name>.json``: the UI-format workflow, what ComfyUI's Export writes (``graph.serialize()``);
- ``example_workflows/api/<name>.json``: the API-format copy the tests run (``app.graphToPrompt()``), so the two
  cannot drift apart;
- ``example_workflows/<name>.jpg``: the template thumbnail, a screenshot of the graph;
- ``docs/comfyui_workflow.png`` (the basic workflow only): the full-size screenshot, for the docs.

It boots ComfyUI on the integration test's base directory (``tests/comfyui_integration.py``: the pack and its tiny
test models, under the usual file names, so every dropdown value is valid) and needs the Debian ``chromium``
package. Nothing is fetched from the network.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from comfyui_integration import (
    Browser,
    ComfyUI,
    find_python,
    make_base,
    work_dir,
    write_inputs,
    write_models,
)

from fantasytalking_core.settings import DEFAULT_NEGATIVE_PROMPT

OUT = ROOT / "example_workflows"
DOCS = ROOT / "docs"
VIEW = (1900, 1080)  # screenshot size in pixels
THUMBNAIL_WIDTH = 640
DOCS_PICTURE = "talking_portrait"

MODEL_NOTE = """\
Model files (ComfyUI/models/...):
- diffusion_models: {dit}; Wan2.1-I2V-14B-720P is what the released adapter was trained on (480P runs, not the
  released pairing)
- {adapter_folder}: {adapter}
- {wav2vec2_folder}: {wav2vec2}
- text_encoders: umt5_xxl_fp8_e4m3fn_scaled.safetensors
- clip_vision: clip_vision_h.safetensors
- vae: wan_2.1_vae.safetensors
"""


def common_nodes(audio: str, max_frames: int, wav2vec2: str) -> dict:
    """The nodes every FantasyTalking workflow has (API format, node ids as strings)."""
    return {
        "2": {"class_type": "FantasyTalkingWav2Vec2Loader", "inputs": {"model_name": wav2vec2}},
        "3": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "4": {"class_type": "FantasyTalkingAudioEncode",
              "inputs": {"wav2vec2": ["2", 0], "audio": ["3", 0], "fps": 23.0, "max_frames": max_frames}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        # the CLIP vision model itself: Identity Encode takes the official CLIP tokens (no CLIP Vision Encode)
        "9": {"class_type": "FantasyTalkingIdentityEncode",
              "inputs": {"image": ["5", 0], "vae": ["8", 0], "clip_vision": ["6", 0], "image_size": 512}},
        "10": {"class_type": "CLIPLoader",
               "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}},
        # FantasyTalking Text Encode cleans prompts as Wan does and cuts them at 512 tokens, so the workflows
        # carry the official prompts as the official code has them
        "11": {"class_type": "FantasyTalkingTextEncode", "inputs": {"clip": ["10", 0], "text":
            "A woman is talking to the camera with natural expressions and slight head movements."}},
        "12": {"class_type": "FantasyTalkingTextEncode", "inputs": {"clip": ["10", 0], "text": DEFAULT_NEGATIVE_PROMPT}},
        "14": {"class_type": "FantasyTalkingSampler", "inputs": {
            "model": ["1", 0], "positive": ["11", 0], "negative": ["12", 0], "identity": ["9", 0],
            "audio_features": ["4", 0], "steps": 30, "cfg": 5.0, "audio_cfg": 5.0, "audio_guidance_start": 0.0,
            "audio_guidance_end": 1.0, "audio_scale": 1.0, "shift": 5.0, "seed": 1111, "batch_passes": False}},
        "15": {"class_type": "CreateVideo", "inputs": {"images": ["14", 0], "audio": ["14", 1], "fps": ["14", 2]}},
        "16": {"class_type": "SaveVideo", "inputs": {"video": ["15", 0], "format": "mp4", "format.codec": "h264"}},
    }


def talking_portrait() -> dict:
    nodes = common_nodes("voice.wav", 81, "wav2vec2-base-960h.safetensors")
    nodes["1"] = {"class_type": "FantasyTalkingModelLoader", "inputs": {
        "model_name": "wan2.1_i2v_720p_14B_fp16.safetensors", "adapter_name": "fantasytalking_fp16.safetensors",
        "weight_dtype": "default", "compute_dtype": "bf16"}}
    nodes["13"] = {"class_type": "FantasyTalkingMotion",
                   "inputs": {"face_intensity": 0.5, "body_intensity": 0.5, "affect_audio_cfg": False}}
    nodes["14"]["inputs"]["motion"] = ["13", 0]
    # the sampler's video to Save Video: the frames with the voice, or past max_image_frames the mp4 it wrote (its
    # images are then 16 preview frames, which Create Video would have saved as the video)
    del nodes["15"]
    nodes["16"]["inputs"].update(video=["14", 3], filename_prefix="FantasyTalking/talking_portrait")
    note = ("# FantasyTalking: talking portrait\n\nChoose a portrait in Load Image and a voice recording in Load Audio, "
            "then Run. The video is as long as the recording, up to max_frames (81 frames = 3.5 s at 23 fps).\n\n"
            + MODEL_NOTE.format(dit="wan2.1_i2v_720p_14B_fp16.safetensors (bf16, fp8, GGUF also work)",
                                adapter_folder="diffusion_models or fantasytalking",
                                adapter="fantasytalking_fp16.safetensors",
                                wav2vec2_folder="audio_encoders",
                                wav2vec2="wav2vec2-base-960h.safetensors (facebook/wav2vec2-base-960h's model.safetensors, renamed)")
            + "\nMotion Intensity at 0.5 / 0.5 is the released model's behaviour.")
    return {"api": nodes, "note": note}


def long_recording() -> dict:
    nodes = common_nodes("long_recording.wav", 13805, "wav2vec2-base-960h.safetensors")
    nodes["1"] = {"class_type": "FantasyTalkingModelLoader", "inputs": {
        "model_name": "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors", "adapter_name": "fantasytalking_model.ckpt",
        "weight_dtype": "fp8_e4m3fn", "compute_dtype": "bf16"}}
    nodes["14"]["inputs"].update(segment_frames=81, chaining="last_frame", motion_frames=9, color_match=0.0,
                                 crossfade=False, max_image_frames=1500, filename_prefix="FantasyTalking/long_recording")
    del nodes["15"]  # the sampler's video output goes to Save Video as it is: frames + voice, or the mp4 it wrote
    nodes["16"]["inputs"].update(video=["14", 3], filename_prefix="FantasyTalking/long_recording_saved")
    note = ("# FantasyTalking: long recording\n\nA recording of any length, up to Audio Encode's max_frames (13805 "
            "= 10 minutes at 23 fps; raise it for longer). The sampler makes it in segments of segment_frames (81, "
            "the trained clip length) on one timeline, each segment continuing the previous one (chaining: "
            "last_frame, motion_frames or pinned_latents; no quality comparison of them on the real weights "
            "yet); color_match and crossfade smooth the seams.\n\nUp to max_image_frames (1500 = 65 s at 23 fps) "
            "the frames stay in memory (12 bytes per pixel each: 10 minutes at 512x512 would be 43 GB) and Save "
            "Video encodes them; a longer video is written by the sampler itself, segment by segment, to "
            "output/FantasyTalking/long_recording_*.mp4 with the voice (shown on the node), and Save Video keeps a "
            "copy. Cancel leaves no partial file. The DiT is kept in 8 bits (weight_dtype fp8_e4m3fn: half the "
            "memory of bf16).\n\n"
            + MODEL_NOTE.format(dit="wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors (or any other format)",
                                adapter_folder="fantasytalking", adapter="fantasytalking_model.ckpt",
                                wav2vec2_folder="audio_encoders", wav2vec2="wav2vec2-base-960h.safetensors"))
    return {"api": nodes, "note": note, "note_size": (424, 420)}


def face_crop_paste_back() -> dict:
    nodes = common_nodes("voice.wav", 81, "wav2vec2-base-960h.safetensors")
    nodes["5"]["inputs"]["image"] = "group_photo.png"
    nodes["1"] = {"class_type": "FantasyTalkingModelLoader", "inputs": {
        "model_name": "wan2.1_i2v_720p_14B_fp16.safetensors", "adapter_name": "fantasytalking_fp16.safetensors",
        "weight_dtype": "default", "compute_dtype": "bf16"}}
    nodes["17"] = {"class_type": "FantasyTalkingFaceCrop", "inputs": {
        "image": ["5", 0], "face_index": 0, "margin": 0.6, "fallback_whole_image": False}}
    nodes["9"]["inputs"].update(image=["17", 0], crop_info=["17", 1])
    nodes["13"] = {"class_type": "FantasyTalkingMotion",
                   "inputs": {"face_intensity": 0.7, "body_intensity": 0.4, "affect_audio_cfg": False}}
    nodes["14"]["inputs"].update(motion=["13", 0], filename_prefix="FantasyTalking/face_crop_paste_back")
    nodes["18"] = {"class_type": "FantasyTalkingFacePasteBack",
                   "inputs": {"images": ["14", 0], "crop_info": ["17", 1], "feather": 16}}
    nodes["15"]["inputs"]["images"] = ["18", 0]
    nodes["16"]["inputs"]["filename_prefix"] = "FantasyTalking/face_crop_paste_back"
    note = ("# FantasyTalking: face crop and paste-back\n\nFor a small face in a large photo: Face Crop cuts a square "
            "around the largest face (or the face you paint in a mask), the model spends its whole resolution on it, "
            "and Face Paste Back puts the talking face into the full-size photo with a feathered edge. An upscaler can "
            "sit between the sampler and the paste-back. A video longer than the sampler's max_image_frames is "
            "pasted back by the sampler itself, into the file it writes: connect its video to Save Video then. Motion Intensity here livens the lips (0.7) and calms the "
            "head (0.4); the face region comes from the crop. Training-free: the paper's face modules were never "
            "released.\n\n"
            + MODEL_NOTE.format(dit="wan2.1_i2v_720p_14B_fp16.safetensors (bf16, fp8, GGUF also work)",
                                adapter_folder="diffusion_models or fantasytalking",
                                adapter="fantasytalking_fp16.safetensors",
                                wav2vec2_folder="audio_encoders",
                                wav2vec2="wav2vec2-base-960h.safetensors (facebook/wav2vec2-base-960h's model.safetensors, renamed)"))
    return {"api": nodes, "note": note}


# Where each model file of the examples comes from: ComfyUI's front end reads these from a loader node's
# properties.models and offers the download in its missing-models dialog.
_REPACKAGED = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
MODEL_SOURCES = {
    "wan2.1_i2v_720p_14B_fp16.safetensors": ("diffusion_models", f"{_REPACKAGED}/diffusion_models/"
                                             "wan2.1_i2v_720p_14B_fp16.safetensors"),
    "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors": ("diffusion_models", f"{_REPACKAGED}/diffusion_models/"
                                                   "wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors"),
    "fantasytalking_fp16.safetensors": ("diffusion_models",
                                        "https://huggingface.co/Kijai/WanVideo_comfy/resolve/main/fantasytalking_fp16.safetensors"),
    "fantasytalking_model.ckpt": ("fantasytalking",
                                  "https://huggingface.co/acvlab/FantasyTalking/resolve/main/fantasytalking_model.ckpt"),
    "wav2vec2-base-960h.safetensors": ("audio_encoders",
                                       "https://huggingface.co/facebook/wav2vec2-base-960h/resolve/main/model.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", f"{_REPACKAGED}/text_encoders/"
                                               "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "clip_vision_h.safetensors": ("clip_vision", f"{_REPACKAGED}/clip_vision/clip_vision_h.safetensors"),
    "wan_2.1_vae.safetensors": ("vae", f"{_REPACKAGED}/vae/wan_2.1_vae.safetensors"),
}

NATIVE_NOTE = """\
# FantasyTalking on ComfyUI's own Wan model (native route)

The Wan model loads through Load Diffusion Model (or a GGUF loader), so ComfyUI's memory management, LoRAs,
attention and caching patches and samplers all apply. FantasyTalking Apply Audio adds the voice to every block;
FantasyTalking Guider runs the official three guidance passes; FantasyTalking Sigmas is the official schedule.
Same numbers as the FantasyTalking Sampler on the same weights (docs/comfyui.md says when to use which).

- Audio Encode's num_frames sets WanImageToVideo's length; its audio and fps go to Create Video.
- A LoRA: enable the bypassed LoraLoaderModelOnly (Ctrl+B). Step-distilled LoRAs: cfg 1 in the guider.
- CLIP Vision Encode + WanImageToVideo approximate the official image preprocessing (the pack route's Identity
  Encode is exact). At 512x512 both center-crop a portrait of another shape; for the official framing set
  WanImageToVideo's width and height to the portrait's shape (multiples of 16) and CLIP Vision Encode's crop to none.

Model files (ComfyUI/models/...): diffusion_models: wan2.1_i2v_720p_14B_fp16.safetensors (or fp8 / GGUF);
fantasytalking: fantasytalking_model.ckpt; audio_encoders: wav2vec2-base-960h.safetensors; text_encoders:
umt5_xxl_fp8_e4m3fn_scaled.safetensors; clip_vision: clip_vision_h.safetensors; vae: wan_2.1_vae.safetensors
"""


def native_wan_route() -> dict:
    """The native route: ComfyUI's Wan model, patched, sampled with SamplerCustomAdvanced."""
    nodes = common_nodes("voice.wav", 81, "wav2vec2-base-960h.safetensors")
    for unused in ("9", "14"):  # the pack's Identity Encode and sampler
        nodes.pop(unused)
    dual = "FantasyTalking Guider / Dual CFG Guider (cond1)"
    nodes.update({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_i2v_720p_14B_fp16.safetensors",
                                                     "weight_dtype": "default"}},
        "19": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "wan_lora.safetensors",
                                                               "strength_model": 1.0}},
        "21": {"class_type": "FantasyTalkingAdapterLoader", "inputs": {"adapter_name": "fantasytalking_model.ckpt",
                                                                       "weight_dtype": "default"}},
        "22": {"class_type": "FantasyTalkingApplyAudio", "inputs": {
            "model": ["19", 0], "adapter": ["21", 0], "audio_features": ["4", 0], "audio_scale": 1.0, "audio_on": dual}},
        "7": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["6", 0], "image": ["5", 0], "crop": "center"}},
        "20": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["11", 0], "negative": ["12", 0], "vae": ["8", 0], "width": 512, "height": 512,
            "length": ["4", 1], "batch_size": 1, "clip_vision_output": ["7", 0], "start_image": ["5", 0]}},
        "23": {"class_type": "FantasyTalkingGuider", "inputs": {
            "model": ["22", 0], "positive": ["20", 0], "negative": ["20", 1], "cfg": 5.0, "audio_cfg": 5.0,
            "audio_guidance_start": 0.0, "audio_guidance_end": 1.0}},
        "24": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "25": {"class_type": "FantasyTalkingSigmas", "inputs": {"steps": 30, "shift": 5.0}},
        "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1111}},
        "26": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["14", 0], "guider": ["23", 0], "sampler": ["24", 0], "sigmas": ["25", 0],
            "latent_image": ["20", 2]}},
        "27": {"class_type": "VAEDecode", "inputs": {"samples": ["26", 0], "vae": ["8", 0]}},
    })
    nodes["15"]["inputs"] = {"images": ["27", 0], "audio": ["4", 2], "fps": ["4", 3]}
    nodes["16"]["inputs"]["filename_prefix"] = "FantasyTalking/native_wan_route"
    positions = {"1": (20, 60), "19": (20, 200), "21": (20, 330), "2": (20, 440), "10": (20, 550), "6": (20, 700),
                 "8": (20, 800), "5": (480, 60), "3": (480, 470),
                 "11": (860, 60), "12": (860, 270), "4": (860, 560), "7": (860, 760), "22": (860, 880),
                 "20": (1340, 60), "23": (1340, 360), "24": (1340, 620), "25": (1340, 720), "14": (1340, 860),
                 "26": (1760, 60), "27": (1760, 320), "15": (1760, 440), "16": (1760, 580)}
    groups = [("Models", ["1", "19", "21", "2", "10", "6", "8"]), ("Portrait and voice", ["5", "3"]),
              ("Encode and patch", ["11", "12", "4", "7", "22"]), ("Guide and sample", ["20", "23", "24", "25", "14"]),
              ("Decode and save", ["26", "27", "15", "16"])]
    return {"api": nodes, "note": NATIVE_NOTE, "positions": positions, "groups": groups, "bypass": ["19"],
            "note_pos": (8, 930), "note_size": (440, 420)}


WORKFLOWS = {"talking_portrait": talking_portrait, "long_recording": long_recording,
             "face_crop_paste_back": face_crop_paste_back, "native_wan_route": native_wan_route}

# Canvas layout shared by the workflows: node id -> position; groups: title, node ids. Sizes are the front end's.
POSITIONS = {"1": (20, 60), "2": (20, 250), "10": (20, 360), "6": (20, 520), "8": (20, 620),
             "5": (480, 60), "3": (480, 470),
             "11": (860, 60), "12": (860, 270), "9": (860, 560), "4": (860, 830), "13": (860, 1040),
             "14": (1360, 60), "18": (1360, 880), "15": (1360, 1020), "16": (1360, 1160), "17": (480, 700)}
SAVE_UNDER_SAMPLER = (1360, 880)  # Save Video's place when it takes the sampler's video directly
SIZES = {"1": (400, 150), "2": (400, 60), "10": (400, 110), "6": (400, 60), "8": (400, 60),
         "11": (440, 160), "12": (440, 160)}
GROUPS = [("Models", ["1", "2", "10", "6", "8"]), ("Portrait and voice", ["5", "3", "17"]),
          ("Encode", ["11", "12", "9", "4", "13"]), ("Generate and save", ["14", "18", "15", "16"])]
NOTE_POS, NOTE_SIZE = (8, 750), (424, 300)


BUILD_GRAPH = """(async (api, name, positions, sizes, groups, note, notePos, noteSize, bypass, sources) => {
  app.graph.clear();
  await app.loadApiJson(api, name);
  const g = app.graph;
  for (const [id, pos] of Object.entries(positions)) { const n = g.getNodeById(Number(id)); if (n) n.pos = pos; }
  for (const [id, size] of Object.entries(sizes)) { const n = g.getNodeById(Number(id)); if (n) n.size = size; }
  for (const n of g._nodes) {  // seeds stay as written: the example reproduces
    const seed = (n.widgets || []).find(w => w.name === 'control_after_generate');
    if (seed) seed.value = 'fixed';
  }
  for (const id of bypass) g.getNodeById(Number(id)).mode = 4;  // optional nodes: bypassed until enabled
  for (const n of g._nodes) {  // where to download each model file: the front end's missing-models dialog
    const models = (n.widgets || []).filter(w => w.value in sources)
      .map(w => ({name: w.value, url: sources[w.value][1], directory: sources[w.value][0]}));
    if (models.length) n.properties.models = models;
  }
  const memo = LiteGraph.createNode('MarkdownNote');
  memo.pos = notePos; memo.size = noteSize; memo.widgets[0].value = note; memo.title = 'Read me';
  g.add(memo);
  const title = LiteGraph.NODE_TITLE_HEIGHT, pad = 12, head = 40;
  for (const [name, ids] of groups) {
    const nodes = ids.map(i => g.getNodeById(Number(i))).filter(n => n && n !== memo);  // the memo may take a free id
    if (!nodes.length) continue;
    const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
    const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const group = new LiteGraph.LGraphGroup(name);
    group.pos = [x0 - pad, y0 - pad - head];
    group.size = [x1 - x0 + 2 * pad, y1 - y0 + 2 * pad + head];
    g.add(group);
  }
  app.canvas.setDirty(true, true);
  return g._nodes.length;
})"""

FIT_VIEW = """((width, height) => {
  const items = [...app.graph._nodes.map(n => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]),
                 ...app.graph._groups.map(g => [g.pos[0], g.pos[1], g.size[0], g.size[1]])];
  const x0 = Math.min(...items.map(b => b[0])), y0 = Math.min(...items.map(b => b[1]));
  const x1 = Math.max(...items.map(b => b[0] + b[2])), y1 = Math.max(...items.map(b => b[1] + b[3]));
  const scale = 0.97 * Math.min(width / (x1 - x0), height / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [(width / scale - (x1 - x0)) / 2 - x0, (height / scale - (y1 - y0)) / 2 - y0];
  app.canvas.setDirty(true, true);
  return scale;
})"""


CLOSE_DIALOGS = """(() => {
  const dialog = app.extensionManager.dialog;
  for (let i = 0; i < 5 && dialog.closeDialog; i++) dialog.closeDialog();
  document.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape", bubbles: true}));
  return document.querySelectorAll(".p-dialog").length;
})()"""


def build(browser: Browser, name: str, spec: dict) -> tuple[dict, dict, bytes]:
    """(UI workflow, API prompt, PNG screenshot) of one workflow, made by the front end."""
    positions = spec.get("positions", POSITIONS)
    if "16" in spec["api"] and "15" not in spec["api"]:  # no Create Video between the sampler and Save Video
        positions = {**positions, "16": SAVE_UNDER_SAMPLER}
    args = [spec["api"], name, positions, SIZES, spec.get("groups", GROUPS), spec["note"],
            spec.get("note_pos", NOTE_POS), spec.get("note_size", NOTE_SIZE), spec.get("bypass", []), MODEL_SOURCES]
    browser.js(f"{BUILD_GRAPH}(...{json.dumps(args, ensure_ascii=False)})")
    time.sleep(1.0)  # widgets settle (image preview, dynamic combos)
    ui = json.loads(browser.js("JSON.stringify(app.graph.serialize())"))
    prompt = json.loads(browser.js("(async () => JSON.stringify((await app.graphToPrompt()).output))()"))
    scale = browser.js(f"{FIT_VIEW}({VIEW[0]}, {VIEW[1]})")
    if scale < 0.6:
        raise RuntimeError(f"{name}: the graph needs zoom {scale:.2f} to fit; below 0.6 the canvas drops the text")
    time.sleep(1.0)
    # the front end may open its templates browser once a graph is loaded: close every dialog before the picture
    browser.js(CLOSE_DIALOGS)
    time.sleep(0.5)
    return ui, prompt, browser.screenshot()


def save(name: str, ui: dict, prompt: dict, png: bytes) -> None:
    from PIL import Image

    (OUT / "api").mkdir(parents=True, exist_ok=True)
    ui.get("extra", {}).pop("ds", None)  # the viewport of this session, not part of the workflow
    (OUT / f"{name}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "api" / f"{name}.json").write_text(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if name == DOCS_PICTURE:
        image.save(DOCS / "comfyui_workflow.png", optimize=True)
    image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
    image.save(OUT / f"{name}.jpg", quality=85)


def main() -> int:
    tree = Path(os.environ["COMFYUI_PATH"]).expanduser()
    base = make_base(work_dir())
    write_models(base / "models")
    write_inputs(base / "input")
    comfy = ComfyUI(tree, find_python(tree), base, work_dir() / "comfyui-build-workflows.log")
    try:
        for name, make in WORKFLOWS.items():
            # a fresh front end (own profile) per workflow: one page keeps widget values by node id from the graph
            # it showed before (a note's text, a prefix the next graph leaves at its default)
            browser = Browser(comfy.url, VIEW)
            try:
                browser.js(CLOSE_DIALOGS)
                browser.js("app.extensionManager.focusMode = true")
                for setting, value in (("Comfy.Minimap.Visible", False), ("Comfy.Graph.CanvasInfo", False)):
                    browser.js(f"app.extensionManager.setting.set({json.dumps(setting)}, {json.dumps(value)})")
                save(name, *build(browser, name, make()))
            finally:
                browser.close()
            print(f"wrote example_workflows/{name}.json, api/{name}.json, {name}.jpg")
    finally:
        comfy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
