"""`python -m fantasytalking_core parity DIR`: the official set passes; other sets of the same layout work; a wrong
stored output makes it fail with a non-zero exit."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from fantasytalking_core.cli import main
from model_files import write_fixture_set, wan_config


def run_cli(path):
    proc = subprocess.run([sys.executable, "-m", "fantasytalking_core", "parity", str(path)], capture_output=True, text=True)
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
def other_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("other") / "set"
    config = wan_config(dim=96, num_heads=3, num_layers=3, ffn_dim=160, text_dim=24)
    write_fixture_set(root, config, proj_dim=40, num_frames=13, height=32, width=64, seed=7)
    return root


def test_other_size_seed_frames_and_non_square_set(other_set, capsys):
    assert main(["parity", str(other_set)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert any(x["name"] == "dit/pred_audio_custom_masked" for x in lines)
    assert all(x["pass"] for x in lines)


def test_a_wrong_stored_output_fails(other_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(other_set, broken)
    outputs = load_file(broken / "dit_outputs.safetensors")
    outputs["pred_audio1_masked"][0, 0, 0, 0, 0] += 0.01 * outputs["pred_audio1_masked"].abs().max()
    save_file(outputs, str(broken / "dit_outputs.safetensors"), metadata={"custom_audio_scale": "0.4"})
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["dit/pred_audio1_masked"]["pass"]
    assert lines["dit/pred_audio0"]["pass"]


def test_a_missing_stored_output_fails_instead_of_being_skipped(other_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "incomplete"
    shutil.copytree(other_set, broken)
    ref = load_file(broken / "sampling.safetensors")
    del ref["step1.pred_pos_audio"]
    save_file(ref, str(broken / "sampling.safetensors"))
    assert main(["parity", str(broken)]) == 1
    lines = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["sampling/step1.pred_pos_audio"]["pass"] and lines["sampling/step0.pred_pos_audio"]["pass"]


def test_not_a_fixture_set_is_one_clear_line(tmp_path):
    rc, lines, err = run_cli(tmp_path)
    assert rc == 2 and lines == [] and err.strip().startswith("error:") and "Traceback" not in err


def test_items_whose_files_are_missing_fail_with_a_note_instead_of_being_skipped(other_set, tmp_path, capsys):
    import shutil

    broken = tmp_path / "partial"
    shutil.copytree(other_set, broken)
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
