"""nodes/model_files.py: the loader dropdowns and where a chosen entry is on disk, without ComfyUI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nodes.model_files import adapter_choices, dit_choices, resolve_wav2vec2, wav2vec2_folders


def test_dit_choices_show_each_model_once_and_hide_configs_shards_and_the_adapter():
    shard_dir = "Wan2.1-I2V-14B-480P"
    files = [
        "wan2.1_i2v_480p_14B_bf16.safetensors",
        "wan2.1-i2v-14b-480p-Q8_0.gguf",
        "fantasytalking_fp16.safetensors",
        "config.json",
        os.path.join(shard_dir, "config.json"),
        os.path.join(shard_dir, "diffusion_pytorch_model.safetensors.index.json"),
        *(os.path.join(shard_dir, f"diffusion_pytorch_model-0000{i}-of-00007.safetensors") for i in range(1, 8)),
        os.path.join("loose", "model-00001-of-00002.safetensors"),  # shards without an index stay choosable
    ]
    assert dit_choices(files) == sorted([
        "wan2.1_i2v_480p_14B_bf16.safetensors",
        "wan2.1-i2v-14b-480p-Q8_0.gguf",
        os.path.join(shard_dir, "diffusion_pytorch_model.safetensors.index.json"),
        os.path.join("loose", "model-00001-of-00002.safetensors"),
    ])


def test_adapter_choices_list_the_own_folder_then_adapters_kept_with_diffusion_models():
    own = ["fantasytalking_model.ckpt", "notes.txt"]
    diffusion = ["wan2.1_i2v_480p_14B_fp16.safetensors", "fantasytalking_fp16.safetensors",
                 os.path.join("kijai", "FantasyTalking_fp16.safetensors"), "fantasytalking_model.ckpt"]
    assert adapter_choices(own, diffusion) == [
        "fantasytalking_model.ckpt", "fantasytalking_fp16.safetensors", os.path.join("kijai", "FantasyTalking_fp16.safetensors")]


def make_hf_folder(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_wav2vec2_folders_are_found_by_model_type(tmp_path):
    root = tmp_path / "transformers"
    make_hf_folder(root / "facebook" / "wav2vec2-base-960h", "wav2vec2")
    make_hf_folder(root / "openai" / "whisper-small", "whisper")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    assert wav2vec2_folders([root, tmp_path / "absent"]) == ["transformers/facebook/wav2vec2-base-960h"]


def test_resolve_wav2vec2_files_folders_and_missing(tmp_path):
    audio, transformers = tmp_path / "audio_encoders", tmp_path / "transformers"
    audio.mkdir()
    (audio / "wav2vec2-base-960h.safetensors").write_bytes(b"")
    inside = make_hf_folder(audio / "wav2vec2-base-960h", "wav2vec2")
    hub = make_hf_folder(transformers / "facebook" / "wav2vec2-base-960h", "wav2vec2")
    roots = ([audio], [transformers])
    assert resolve_wav2vec2("wav2vec2-base-960h.safetensors", *roots) == audio / "wav2vec2-base-960h.safetensors"
    assert resolve_wav2vec2("wav2vec2-base-960h/model.safetensors", *roots) == inside  # the folder, with its config
    assert resolve_wav2vec2("transformers/facebook/wav2vec2-base-960h", *roots) == hub
    assert resolve_wav2vec2("transformers/facebook/absent", *roots) is None
    assert resolve_wav2vec2("absent.safetensors", *roots) is None


def test_resolve_wav2vec2_stays_in_its_models_folders(tmp_path):
    # an API prompt may name any path (ComfyUI skips its dropdown check for inputs validate_inputs takes)
    audio, transformers = tmp_path / "models" / "audio_encoders", tmp_path / "models" / "transformers"
    audio.mkdir(parents=True)
    (tmp_path / "secret.safetensors").write_bytes(b"")
    outside = make_hf_folder(tmp_path / "elsewhere", "wav2vec2")
    roots = ([audio], [transformers])
    assert resolve_wav2vec2(str(tmp_path / "secret.safetensors"), *roots) is None  # absolute
    assert resolve_wav2vec2("../../secret.safetensors", *roots) is None
    assert resolve_wav2vec2("transformers/../../../elsewhere", *roots) is None
    assert resolve_wav2vec2(str(outside / "config.json"), *roots) is None
    assert outside.is_dir() and (tmp_path / "secret.safetensors").is_file()  # they exist: only the folder rule refuses


def test_wav2vec2_folders_look_into_linked_models_folders_and_links_back_up_end(tmp_path):
    root = tmp_path / "transformers"
    make_hf_folder(tmp_path / "other_disk" / "wav2vec2-base-960h", "wav2vec2")
    root.mkdir()
    try:
        os.symlink(tmp_path / "other_disk", root / "facebook", target_is_directory=True)
        os.symlink(root, tmp_path / "other_disk" / "up", target_is_directory=True)  # back up the tree
        os.symlink(root, root / "self", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("folder links cannot be made here")
    found = wav2vec2_folders([root])
    assert "transformers/facebook/wav2vec2-base-960h" in found
    assert all(entry.count("/") < 8 for entry in found)  # each link back up is entered once at most
