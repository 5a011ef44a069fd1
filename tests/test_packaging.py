"""pyproject.toml and requirements.txt: what the Comfy Registry and ComfyUI Manager read."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines() -> list[str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_dependencies_mirror_requirements_and_leave_torch_alone():
    assert PYPROJECT["project"]["dependencies"] == requirement_lines()
    names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requirement_lines()}
    assert not names & {"torch", "torchvision", "torchaudio"}  # ComfyUI already chose its torch build


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9_.-]*", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = comfy["Icon"]
    assert icon.startswith("https://") and (ROOT / icon.split("/main/", 1)[1]).is_file()  # the file it points at
