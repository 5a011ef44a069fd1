"""pyproject.toml and requirements.txt: what the Comfy Registry and ComfyUI Manager read."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from the test extra
    import tomli as tomllib

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


def test_the_built_wheel_runs_generate_tiny(tmp_path):
    """What `pip install` puts on disk: the wheel built from this tree, unpacked away from the checkout, runs the
    installation check (`generate --tiny`); a config or subpackage missing from the wheel fails it."""
    import subprocess
    import sys
    import zipfile

    # build from a copy of the source files: a build/ folder left in a checkout would leak stale files into the wheel
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    for name in listed:
        if not name.startswith("tests/") and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fantasytalking-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fantasytalking_core; print(fantasytalking_core.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(site)  # the wheel's copy, not the checkout
    image, audio, out = tmp_path / "portrait.png", tmp_path / "voice.wav", tmp_path / "out.mp4"
    _write_inputs(image, audio)
    run = subprocess.run([sys.executable, "-m", "fantasytalking_core", "generate", "--tiny", "--image", str(image),
                          "--audio", str(audio), "--out", str(out), "--steps", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and out.stat().st_size > 0, run.stderr[-2000:]


def _write_inputs(image: Path, audio: Path) -> None:
    import wave

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 48, 3)) * 255).astype("uint8")).save(image)
    t = np.arange(8000) / 16000
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
