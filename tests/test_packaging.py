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


def test_a_wheel_ships_every_subpackage_and_config():
    """setuptools finds packages by their __init__.py and ships only the package-data globs: a folder without one,
    or a config outside the globs, works from a checkout but is missing from an installed wheel."""
    engine = ROOT / "fantasytalking_core"
    for folder in {p.parent for p in engine.rglob("*.py")}:
        assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["fantasytalking_core"]
    shipped = {p for g in globs for p in engine.glob(g)}
    configs = set((engine / "configs").rglob("*.json"))
    assert configs and configs <= shipped, sorted(str(p) for p in configs - shipped)
