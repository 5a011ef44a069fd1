"""`pip install -r requirements.txt` needs no compiler on Linux, Windows and macOS, x86-64 and arm64, Python 3.10 to
3.13: every requirement (and the compiled packages diffusers, transformers and accelerate pull in) has a wheel there
on PyPI, or is left out there by its environment marker (and the code says what is unavailable).

Reads PyPI's JSON API (the registry CI installs from anyway); nothing is downloaded but the release listings.
"""

from __future__ import annotations

import json
import urllib.request
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13))
# Windows on ARM: numpy, PyYAML and PyAV publish wheels for Python 3.12 and newer only (torch too)
FIRST_PYTHON = {"windows-arm64": (3, 12)}


def _macos(arch: str, versions: list[tuple[int, int]]) -> list[str]:
    return [f"macosx_{major}_{minor}_{tag}" for major, minor in versions for tag in (arch, "universal2")]


# platform -> (marker values, wheel platform tags pip accepts there, newest first)
PLATFORMS = {
    "linux-x86_64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
                     [f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)] + ["manylinux2014_x86_64",
                                                                               "manylinux2010_x86_64", "manylinux1_x86_64"]),
    "linux-aarch64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
                      [f"manylinux_2_{m}_aarch64" for m in range(35, 16, -1)] + ["manylinux2014_aarch64"]),
    "windows-amd64": ({"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
                      ["win_amd64"]),
    "windows-arm64": ({"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "ARM64"},
                      ["win_arm64"]),
    "macos-arm64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
                    _macos("arm64", [(15, 0), (14, 0), (13, 0), (12, 0), (11, 0)])),
    "macos-x86_64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
                     _macos("x86_64", [(15, 0), (14, 0), (13, 0), (12, 0), (11, 0)] + [(10, m) for m in range(15, 8, -1)])
                     + [f"macosx_10_{m}_intel" for m in range(15, 8, -1)]),
}
# compiled packages the direct requirements install (not listed in requirements.txt, installed all the same)
INDIRECT = ("tokenizers>=0.19", "regex", "pyyaml", "psutil", "numpy>=1.24")
# sdists that build without a compiler (data only)
PURE_SDISTS = {"face-recognition-models"}


def requirements() -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line] + [Requirement(r) for r in INDIRECT]


@cache
def pypi_files(name: str) -> dict[Version, list[str]]:
    """Released (not yanked, not pre-release) version -> its file names, from PyPI."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as reply:
        data = json.load(reply)
    out = {}
    for version, files in data["releases"].items():
        try:
            parsed = Version(version)
        except ValueError:
            continue
        kept = [f["filename"] for f in files if not f.get("yanked")]
        if kept and not parsed.is_prerelease:
            out[parsed] = kept
    return out


def installable(req: Requirement, platform: str, python: tuple[int, int]) -> str | None:
    """The newest version pip could install without building (its file name), else None."""
    tags = set(cpython_tags(python, platforms=PLATFORMS[platform][1]))
    tags |= set(compatible_tags(python, f"cp{python[0]}{python[1]}", PLATFORMS[platform][1]))
    for version in sorted(pypi_files(req.name), reverse=True):
        if version not in req.specifier:
            continue
        for name in pypi_files(req.name)[version]:
            if name.endswith(".whl") and parse_wheel_filename(name)[3] & tags:
                return name
            if name.endswith(".tar.gz") and canonicalize_name(req.name) in PURE_SDISTS:
                return name
    return None


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_requirement_installs_without_a_compiler(platform):
    missing = []
    for python in (p for p in PYTHONS if p >= FIRST_PYTHON.get(platform, PYTHONS[0])):
        env = PLATFORMS[platform][0] | {"python_version": f"{python[0]}.{python[1]}",
                                        "python_full_version": f"{python[0]}.{python[1]}.0"}
        for req in requirements():
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # left out here by its marker
            if installable(req, platform, python) is None:
                missing.append(f"{req} on Python {python[0]}.{python[1]}")
    assert not missing, f"{platform}: no wheel for " + "; ".join(missing)
