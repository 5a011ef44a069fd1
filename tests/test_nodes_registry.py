"""nodes/__init__.py: the node registry, without ComfyUI."""

from __future__ import annotations

import re
from pathlib import Path

from nodes import NODE_MODULES

NODES_DIR = Path(__file__).resolve().parents[1] / "nodes"


def test_every_module_with_nodes_is_registered():
    """A nodes/*.py that defines NODES but is missing from NODE_MODULES would silently not appear in ComfyUI."""
    with_nodes = sorted(p.stem for p in NODES_DIR.glob("*.py") if re.search(r"^NODES = ", p.read_text(), re.MULTILINE))
    assert sorted(NODE_MODULES) == with_nodes
    assert len(with_nodes) >= 4


def _widget_inputs() -> list[tuple[str, str, dict]]:
    """(module, io type, keywords) of every ``io.<Type>.Input("name", ...)`` in nodes/*.py, read from the sources
    (no ComfyUI here); keyword values are literals, or names of ``model.limits`` constants."""
    import ast

    from fantasytalking_core.model import limits

    found = []
    for path in NODES_DIR.glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            func = getattr(call, "func", None)
            if not (isinstance(call, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "Input"
                    and isinstance(func.value, ast.Attribute) and call.args and isinstance(call.args[0], ast.Constant)):
                continue
            kwargs = {"name": call.args[0].value}
            for kw in call.keywords:
                if isinstance(kw.value, ast.Name) and hasattr(limits, kw.value.id):
                    kwargs[kw.arg] = getattr(limits, kw.value.id)
                else:
                    try:
                        kwargs[kw.arg] = ast.literal_eval(kw.value)
                    except ValueError:
                        kwargs[kw.arg] = None  # an expression (e.g. float(DEFAULT_FPS)): not needed here
            found.append((path.stem, func.value.attr, kwargs))
    return found


def _front_end_float(value: float, step: float, round_to: float) -> float:
    """What a ComfyUI front end that derives the precision from the step keeps of a typed FLOAT:
    ``Number((Math.round(v / round) * round).toFixed(max(0, -floor(log10(step)))))``."""
    import math

    precision = max(0, -math.floor(math.log10(step)))
    return float(f"{math.floor(value / round_to + 0.5) * round_to:.{precision}f}")  # JavaScript's Math.round


def test_fps_inputs_keep_fractional_values():
    fps = [(module, kind, kw) for module, kind, kw in _widget_inputs() if "fps" in kw["name"]]
    assert fps, "no fps input found: the reader above lost track of the node sources"
    for module, kind, kw in fps:
        assert kind == "Float", f"{module}: {kw['name']} is an {kind} input; fps like 12.5 or 23.976 need a Float"
        for value in (12.5, 23.976, 29.97):
            assert _front_end_float(value, kw["step"], kw["round"]) == value, (module, kw)


def test_clips_are_no_longer_than_the_dit_can_place_and_videos_go_on_in_segments():
    from fantasytalking_core.model.limits import MAX_FRAMES, MAX_VIDEO_FRAMES

    inputs = {(module, kw["name"]): kw for module, kind, kw in _widget_inputs()}
    segment, video = inputs["sampler", "segment_frames"], inputs["audio", "max_frames"]
    assert segment["max"] == MAX_FRAMES == 4093 and (segment["max"] - segment["min"]) % segment["step"] == 0
    assert video["max"] == MAX_VIDEO_FRAMES > MAX_FRAMES and (video["max"] - video["min"]) % video["step"] == 0
    motion = inputs["sampler", "motion_frames"]
    assert (motion["min"], motion["step"]) == (1, 4)  # 4m+1 values only
