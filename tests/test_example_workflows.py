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

from fantasytalking_core.encoders.text import DEFAULT_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # not sent to the server
OUR_NODE_IDS = set(re.findall(r'node_id="(FantasyTalking\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))))


def test_the_example_workflows_are_there():
    assert [p.stem for p in UI_FILES] == ["face_crop_paste_back", "long_recording", "talking_portrait"]


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_thumbnail_and_api_copy(ui_file):
    with Image.open(ui_file.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.width >= 320
    assert (WORKFLOWS / "api" / ui_file.name).is_file()


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_formats_agree(ui_file):
    ui = json.loads(ui_file.read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    links = {link[0]: link for link in ui["links"]}  # id -> [id, from node, from slot, to node, to slot, type]
    for node_id, node in api.items():
        ui_node = nodes[node_id]
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [from node, from slot]
                ui_input = next(i for i in ui_node["inputs"] if i["name"] == name)
                _, source, slot, target, _, _ = links[ui_input["link"]]
                assert [str(source), slot] == value and str(target) == node_id, f"{node_id}.{name}"
            else:
                assert ui_node["widgets_values_named"][name] == value, f"{node_id}.{name}"


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_workflow_uses_our_nodes_and_saves_the_sampler_output_as_video(ui_file):
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    ours = {v["class_type"] for v in api.values() if v["class_type"].startswith("FantasyTalking")}
    assert ours <= OUR_NODE_IDS and len(OUR_NODE_IDS) == 10
    sampler = next(k for k, v in api.items() if v["class_type"] == "FantasyTalkingSampler")
    create = next(v for v in api.values() if v["class_type"] == "CreateVideo")["inputs"]
    paste = next((k for k, v in api.items() if v["class_type"] == "FantasyTalkingFacePasteBack"), None)
    if paste is not None:  # face crop: the sampler's frames go through the paste-back first
        assert api[paste]["inputs"]["images"] == [sampler, 0]
        crop = next(k for k, v in api.items() if v["class_type"] == "FantasyTalkingFaceCrop")
        assert api[paste]["inputs"]["crop_info"] == [crop, 1]
    frames = [paste, 0] if paste is not None else [sampler, 0]
    assert (create["images"], create["audio"], create["fps"]) == (frames, [sampler, 1], [sampler, 2])
    # official CLIP tokens: Identity Encode gets the CLIP vision model itself, not a CLIP Vision Encode output
    identity = next(v for v in api.values() if v["class_type"] == "FantasyTalkingIdentityEncode")["inputs"]
    loader = next(k for k, v in api.items() if v["class_type"] == "CLIPVisionLoader")
    assert identity["clip_vision"] == [loader, 0] and "clip_vision_output" not in identity
    assert not any(v["class_type"] == "CLIPVisionEncode" for v in api.values())
    dit = next(v for v in api.values() if v["class_type"] == "FantasyTalkingModelLoader")["inputs"]["model_name"]
    assert "720p" in dit  # the released adapter's pairing
    save = next(v for v in api.values() if v["class_type"] == "SaveVideo")["inputs"]
    assert save["format"] == "mp4" and save["filename_prefix"].startswith("FantasyTalking/")


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_prompts_go_through_the_official_text_encode(ui_file):
    """FantasyTalking Text Encode cleans prompts as Wan does and cuts them at 512 tokens; the core CLIP Text
    Encode does neither, so the workflows use ours, with the official negative prompt as the official code has it."""
    api = json.loads((WORKFLOWS / "api" / ui_file.name).read_text(encoding="utf-8"))
    assert not any(v["class_type"] == "CLIPTextEncode" for v in api.values())
    texts = [v["inputs"]["text"] for v in api.values() if v["class_type"] == "FantasyTalkingTextEncode"]
    assert len(texts) == 2 and DEFAULT_NEGATIVE_PROMPT in texts
