"""`python -m fantasytalking_core parity DIR`: the official parity set and the official bf16 precision set pass; a
wrong stored output (or a precision bound the package misses) makes it fail with a non-zero exit."""

import json
import subprocess
import sys

import pytest
from cli_runs import run_here
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fantasytalking_core.cli import main


def run_cli(path):
    """``python -m fantasytalking_core parity PATH`` in this process (``cli_runs.run_here``): exit code, the JSON
    lines, stderr."""
    proc = run_here(["parity", str(path)])
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_official_set_passes_every_item(official_dir):
    rc, lines, _ = run_cli(official_dir)
    assert rc == 0
    names = {line["name"] for line in lines}
    assert {"dit/pred_audio1_masked", "dit/pred_audio1_unmasked", "sampling/final_latent", "vae/decoded",
            "clip/penultimate224", "t5/output_trimmed", "frame_rule", "wav2vec2/num_tokens",
            "load/dit_comfy.safetensors+fantasytalking.safetensors", "sampling/step3.pred_pos_audio"} <= names
    assert sum(n.startswith("windows/") for n in names) == 47
    assert all(line["pass"] and set(line) == {"name", "max_abs_error", "rel_error", "tolerance", "pass"} for line in lines)
    final = next(line for line in lines if line["name"] == "sampling/final_latent")
    assert final["rel_error"] < 1e-4


@pytest.fixture(scope="module")
def dit_set(official_dir, tmp_path_factory):
    """The official set without its optional encoder sets (the failure tests below break DiT items only)."""
    import shutil

    root = tmp_path_factory.mktemp("official") / "set"
    shutil.copytree(official_dir, root, ignore=shutil.ignore_patterns("vae", "clip", "t5"))
    return root


def test_precision_set_passes_float32_and_bf16_items(official_bf16_dir, capsys):
    """The official bf16 set (head size 128, non-square latent) is recognised by its files and passes."""
    assert main(["parity", str(official_bf16_dir)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    by_name = {line["name"]: line for line in lines}
    assert set(by_name) == {f"fp32/{n}" for n in ("u", "p", "pa", "guided")} | {
        f"bf16/{n}" for n in ("u", "p", "pa", "guided", "audio_term")}
    assert all(line["pass"] for line in lines)
    assert all(line["ratio"] <= 1.2 and line["rel_error"] <= line["tolerance"]
               for name, line in by_name.items() if name.startswith("bf16/"))


def test_a_precision_set_fails_on_a_wrong_output_or_a_smaller_official_error(official_bf16_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken_bf16"
    shutil.copytree(official_bf16_dir, broken)
    outputs = load_file(broken / "outputs.safetensors")
    outputs["fp32_u"][0, 0, 0, 3, 5] += 0.01 * outputs["fp32_u"].abs().max()
    save_file(outputs, str(broken / "outputs.safetensors"))
    stats = json.loads((broken / "stats.json").read_text())
    stats["official_bf16_rel_rms_vs_fp32"]["guided"] /= 2  # as if the official bf16 run were twice as exact
    (broken / "stats.json").write_text(json.dumps(stats))
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["fp32/u"]["pass"] and lines["fp32/p"]["pass"]
    assert not lines["bf16/guided"]["pass"] and lines["bf16/pa"]["pass"]


def test_a_wrong_stored_output_fails(dit_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dit_set, broken)
    with safe_open(str(broken / "dit_outputs.safetensors"), "pt") as f:
        metadata = f.metadata()
    outputs = load_file(broken / "dit_outputs.safetensors")
    outputs["pred_audio1_masked"][0, 0, 0, 0, 0] += 0.01 * outputs["pred_audio1_masked"].abs().max()
    save_file(outputs, str(broken / "dit_outputs.safetensors"), metadata=metadata)
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["dit/pred_audio1_masked"]["pass"]
    assert lines["dit/pred_audio0"]["pass"] and lines["dit/pred_audio_custom_masked"]["pass"]


def test_a_missing_stored_output_fails_instead_of_being_skipped(dit_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "incomplete"
    shutil.copytree(dit_set, broken)
    ref = load_file(broken / "sampling.safetensors")
    del ref["step1.pred_pos_audio"]
    save_file(ref, str(broken / "sampling.safetensors"))
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["sampling/step1.pred_pos_audio"]["pass"] and lines["sampling/step0.pred_pos_audio"]["pass"]


def test_not_a_fixture_set_is_one_clear_line(tmp_path):
    """The program itself (its own process, unlike the tests above): one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "fantasytalking_core", "parity", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_items_whose_files_are_missing_fail_with_a_note_instead_of_being_skipped(dit_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "partial"
    shutil.copytree(dit_set, broken)
    (broken / "dit" / "dit_comfy.safetensors").unlink()  # the second file layout
    (broken / "sampling.json").unlink()
    (broken / "vae").mkdir()  # a VAE set that lacks its weights and outputs
    (broken / "vae" / "config.json").write_text("{}")
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    failed = {name: x["note"] for name, x in lines.items() if not x["pass"]}
    assert failed == {"load/dit_comfy.safetensors+fantasytalking.safetensors": "missing dit_comfy.safetensors",
                      "sampling": "missing sampling.json",
                      "vae": "vae/: missing vae.pth, vae_io.safetensors"}
    assert lines["dit/pred_audio1_masked"]["pass"] and "note" not in lines["dit/pred_audio1_masked"]
