"""example_workflows/: every UI workflow has its thumbnail and an API copy that says the same thing.

The files are written by tools/build_example_workflows.py through the real front end; these checks catch a hand
edit of one file that the other does not follow. Running them in ComfyUI is tests/comfyui_integration.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fantasytalking_core.settings import DEFAULT_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
# the pack route (FantasyTalking Sampler) and the native route (ComfyUI's Wan model, Apply Audio, Guider)
PACK_FILES = [p for p in UI_FILES if "FantasyTalkingSampler" in (WORKFLOWS / "api" / p.name).read_text()]
NATIVE_FILES = [p for p in UI_FILES if p not in PACK_FILES]
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # not sent to the server
BYPASSED = 4  # LiteGraph node mode of a bypassed node
OUR_NODE_IDS = set(re.findall(r'node_id="(FantasyTalking\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))))


def test_the_example_workflows_are_there():
    assert [p.stem for p in UI_FILES] == ["face_crop_paste_back", "long_recording", "native_wan_route",
                                          "talking_portrait"]
    assert [p.stem for p in NATIVE_FILES] == ["native_wan_route"]


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_thumbnail_and_api_copy(ui_file):
    with Image.open(ui_file.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.width >= 320
    assert (WORKFLOWS / "api" / ui_file.name).is_file()


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_formats_agree(ui_file):
    ui = json.loads(ui_file.read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    every = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    nodes = {k: n for k, n in every.items() if n.get("mode", 0) != BYPASSED}  # the front end leaves bypassed out
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    links = {link[0]: link for link in ui["links"]}  # id -> [id, from node, from slot, to node, to slot, type]

    def source_of(link_id):
        """[node, slot] feeding a link, through bypassed nodes (they pass their input of the same type on)."""
        _, source, slot, _, _, kind = links[link_id]
        while every[str(source)].get("mode", 0) == BYPASSED:
            passed = next(i for i in every[str(source)]["inputs"] if i["type"] == kind)
            _, source, slot, _, _, kind = links[passed["link"]]
        return [str(source), slot]

    for node_id, node in api.items():
        ui_node = nodes[node_id]
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [from node, from slot]
                ui_input = next(i for i in ui_node["inputs"] if i["name"] == name)
                assert links[ui_input["link"]][3] == int(node_id), f"{node_id}.{name}"
                assert source_of(ui_input["link"]) == value, f"{node_id}.{name}"
            else:
                assert ui_node["widgets_values_named"][name] == value, f"{node_id}.{name}"


@pytest.mark.parametrize("ui_file", PACK_FILES, ids=lambda p: p.stem)
def test_workflow_uses_our_nodes_and_saves_the_sampler_output_as_video(ui_file):
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    ours = {v["class_type"] for v in api.values() if v["class_type"].startswith("FantasyTalking")}
    assert ours <= OUR_NODE_IDS and len(OUR_NODE_IDS) == 15
    sampler = next(k for k, v in api.items() if v["class_type"] == "FantasyTalkingSampler")
    save = next(v for v in api.values() if v["class_type"] == "SaveVideo")["inputs"]
    paste = next((k for k, v in api.items() if v["class_type"] == "FantasyTalkingFacePasteBack"), None)
    if paste is None:
        # the sampler's video output (its frames + voice, or past max_image_frames the mp4 it wrote) goes to Save
        # Video: through Create Video, a video past max_image_frames was saved as its 16 preview frames
        assert save["video"] == [sampler, 3] and not any(v["class_type"] == "CreateVideo" for v in api.values())
    if ui_file.stem == "long_recording":  # the segment route
        inputs = api[sampler]["inputs"]
        audio = next(v for v in api.values() if v["class_type"] == "FantasyTalkingAudioEncode")["inputs"]
        assert audio["max_frames"] > inputs["segment_frames"] == 81  # longer than a clip: in segments
        assert 0 < inputs["max_image_frames"] < audio["max_frames"]  # past it, the sampler writes the file
    if paste is not None:  # face crop: the sampler's frames go through the paste-back, then Create Video
        create = next(v for v in api.values() if v["class_type"] == "CreateVideo")["inputs"]
        assert api[paste]["inputs"]["images"] == [sampler, 0]
        crop = next(k for k, v in api.items() if v["class_type"] == "FantasyTalkingFaceCrop")
        assert api[paste]["inputs"]["crop_info"] == [crop, 1]
        assert (create["images"], create["audio"], create["fps"]) == ([paste, 0], [sampler, 1], [sampler, 2])
    # official CLIP tokens: Identity Encode gets the CLIP vision model itself, not a CLIP Vision Encode output
    identity = next(v for v in api.values() if v["class_type"] == "FantasyTalkingIdentityEncode")["inputs"]
    loader = next(k for k, v in api.items() if v["class_type"] == "CLIPVisionLoader")
    assert identity["clip_vision"] == [loader, 0] and "clip_vision_output" not in identity
    assert not any(v["class_type"] == "CLIPVisionEncode" for v in api.values())
    dit = next(v for v in api.values() if v["class_type"] == "FantasyTalkingModelLoader")["inputs"]["model_name"]
    assert "720p" in dit  # the released adapter's pairing
    assert save["format"] == "mp4" and save["filename_prefix"].startswith("FantasyTalking/")


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_prompts_go_through_the_official_text_encode(ui_file):
    """FantasyTalking Text Encode cleans prompts as Wan does and cuts them at 512 tokens; the core CLIP Text
    Encode does neither, so the workflows use ours, with the official negative prompt as the official code has it."""
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    assert not any(v["class_type"] == "CLIPTextEncode" for v in api.values())
    texts = [v["inputs"]["text"] for v in api.values() if v["class_type"] == "FantasyTalkingTextEncode"]
    assert len(texts) == 2 and DEFAULT_NEGATIVE_PROMPT in texts


def test_native_route_workflow_is_wired_as_documented():
    """docs/comfyui.md's native route: Load Diffusion Model -> (bypassed LoRA) -> Apply Audio -> Guider ->
    SamplerCustomAdvanced with the official sigmas; the length and the video's audio and fps come from Audio Encode."""
    ui = json.loads((WORKFLOWS / "native_wan_route.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / "native_wan_route.json").read_text(encoding="utf-8"))

    def one(class_type):
        (node_id,) = [k for k, v in api.items() if v["class_type"] == class_type]
        return node_id, api[node_id]["inputs"]

    lora = [n for n in ui["nodes"] if n["type"] == "LoraLoaderModelOnly"]
    assert len(lora) == 1 and lora[0]["mode"] == 4  # optional: bypassed until the user enables it
    assert not any(v["class_type"] == "LoraLoaderModelOnly" for v in api.values())  # the front end drops it
    unet, unet_in = one("UNETLoader")
    assert "720p" in unet_in["unet_name"]
    adapter, _ = one("FantasyTalkingAdapterLoader")
    encode, _ = one("FantasyTalkingAudioEncode")
    patch, patch_in = one("FantasyTalkingApplyAudio")
    assert (patch_in["model"], patch_in["adapter"], patch_in["audio_features"]) == ([unet, 0], [adapter, 0], [encode, 0])
    assert patch_in["audio_on"].startswith("FantasyTalking Guider")
    wan, wan_in = one("WanImageToVideo")
    assert wan_in["length"] == [encode, 1]
    vision, vision_in = one("CLIPVisionEncode")
    assert wan_in["clip_vision_output"] == [vision, 0]
    guider, guider_in = one("FantasyTalkingGuider")
    assert (guider_in["model"], guider_in["positive"], guider_in["negative"]) == ([patch, 0], [wan, 0], [wan, 1])
    assert (guider_in["cfg"], guider_in["audio_cfg"]) == (5.0, 5.0)
    sigmas, sigmas_in = one("FantasyTalkingSigmas")
    assert (sigmas_in["steps"], sigmas_in["shift"]) == (30, 5.0)
    select, select_in = one("KSamplerSelect")
    assert select_in["sampler_name"] == "euler"
    sampler, sampler_in = one("SamplerCustomAdvanced")
    assert (sampler_in["guider"], sampler_in["sigmas"], sampler_in["sampler"], sampler_in["latent_image"]) == (
        [guider, 0], [sigmas, 0], [select, 0], [wan, 2])
    decode, decode_in = one("VAEDecode")
    assert decode_in["samples"] == [sampler, 0]
    _, create = one("CreateVideo")
    assert (create["images"], create["audio"], create["fps"]) == ([decode, 0], [encode, 2], [encode, 3])
    _, save = one("SaveVideo")
    assert save["format"] == "mp4" and save["filename_prefix"] == "FantasyTalking/native_wan_route"


MODEL_WIDGETS = {"FantasyTalkingModelLoader": ("model_name", "adapter_name"), "UNETLoader": ("unet_name",),
                 "FantasyTalkingAdapterLoader": ("adapter_name",), "FantasyTalkingWav2Vec2Loader": ("model_name",),
                 "CLIPLoader": ("clip_name",), "CLIPVisionLoader": ("clip_name",), "VAELoader": ("vae_name",)}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_every_model_file_says_where_to_download_it(ui_file):
    """The front end's missing-models dialog reads properties.models of the loader nodes."""
    ui = json.loads(ui_file.read_text(encoding="utf-8"))
    checked = 0
    for node in ui["nodes"]:
        if node["type"] not in MODEL_WIDGETS or node.get("mode", 0) == BYPASSED:
            continue
        listed = {m["name"]: m for m in node["properties"].get("models", [])}
        for widget in MODEL_WIDGETS[node["type"]]:
            name = node["widgets_values_named"][widget]
            entry = listed.get(name)
            assert entry, f"{ui_file.stem}: {node['type']} {name} has no download entry"
            assert entry["url"].startswith("https://huggingface.co/") and entry["directory"], entry
            checked += 1
    assert checked >= 5


WIDGET_TYPES = {"Int", "Float", "Boolean", "String", "Combo"}  # inputs the front end draws as widgets


def _schema_inputs() -> dict[str, dict[str, str]]:
    """node_id -> {input name: io type} of every FantasyTalking node, read from nodes/*.py (no ComfyUI here)."""
    import ast

    trees = [ast.parse(path.read_text()) for path in (ROOT / "nodes").glob("*.py")]

    def is_input(node):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Input"

    # helpers that make an input (``adapter_input()``): their name -> the Input call they return
    makers = {f.name: next(c for c in ast.walk(f) if is_input(c))
              for tree in trees for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              and any(is_input(c) for c in ast.walk(f))}
    schemas = {}
    for call in (c for tree in trees for c in ast.walk(tree) if isinstance(c, ast.Call)):
        keywords = {kw.arg: kw.value for kw in call.keywords}
        node_id, inputs = keywords.get("node_id"), keywords.get("inputs")
        if not (isinstance(node_id, ast.Constant) and isinstance(inputs, ast.List)):
            continue
        made = [item if is_input(item) else makers[item.func.id] for item in inputs.elts]
        schemas[node_id.value] = {item.args[0].value: item.func.value.attr for item in made}
    return schemas


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_our_nodes_in_the_workflows_have_every_widget_their_schema_has(ui_file):
    """A workflow built before an input was added lacks it (the front end then fills in the default on load, but
    the file no longer shows the graph it runs): rebuild with tools/build_example_workflows.py."""
    schemas = _schema_inputs()
    assert len(schemas) == len(OUR_NODE_IDS) and schemas["FantasyTalkingSampler"]["steps"] == "Int"
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    for node_id, node in api.items():
        schema = schemas.get(node["class_type"])
        if schema is None:
            continue
        widgets = {name for name, kind in schema.items() if kind in WIDGET_TYPES}
        assert set(node["inputs"]) <= set(schema), f"{node_id} {node['class_type']}: inputs it no longer has"
        assert widgets <= set(node["inputs"]), f"{node_id} {node['class_type']}: missing {widgets - set(node['inputs'])}"


@pytest.fixture(scope="module")
def builder():
    """tools/build_example_workflows.py: the description each workflow file was built from."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_example_workflows", ROOT / "tools" / "build_example_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_each_workflow_file_is_what_its_builder_describes(ui_file, builder):
    """Every value and link the builder sets, and its note, are in the file (a build that carried a value or a note
    over from the workflow built before it shows here)."""
    described = builder.WORKFLOWS[ui_file.stem]()
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    ui = json.loads(ui_file.read_text(encoding="utf-8"))
    bypassed = set(described.get("bypass", []))
    assert set(api) == set(described["api"]) - bypassed
    for node_id, node in api.items():
        assert node["class_type"] == described["api"][node_id]["class_type"]
        for name, value in described["api"][node_id]["inputs"].items():
            while isinstance(value, list) and value[0] in bypassed:  # the front end links past a bypassed node
                value = next(v for v in described["api"][value[0]]["inputs"].values() if isinstance(v, list))
            assert node["inputs"][name] == value, f"{ui_file.stem}: {node_id}.{name}"
    (note,) = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert note == described["note"]
