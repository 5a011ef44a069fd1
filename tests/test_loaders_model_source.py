"""loaders/model_source.py: a model's files and options, picklable, loaded the same way in any process."""

from __future__ import annotations

import pickle

import torch

from fantasytalking_core.loaders.model_source import ModelSource
from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.tiny import make_tiny_models


def test_a_source_crosses_processes_and_loads_the_model_the_loader_loads(tmp_path):
    files = make_tiny_models(tmp_path)
    source = ModelSource(str(files.dit), str(files.adapter), None, torch.float32)
    copy = pickle.loads(pickle.dumps(source.load))()  # what a spawned worker runs
    assert copy.source == source and copy.with_loras([]).source == source
    assert copy.dtype == torch.float32
    reference = load_models(files, compute_dtype=torch.float32).dit  # the command line's loading
    assert reference.source is None  # not loaded from a source: a parallel sampler refuses it
    assert list(copy.state_dict()) == list(reference.state_dict())
    for (name, ours), theirs in zip(copy.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_default_weights_stay_as_an_fp8_file_stores_them(tmp_path):
    # "default" kept an fp8 file in the compute dtype: twice the memory of ComfyUI's Load Diffusion Model, which
    # keeps fp8 files fp8 (the common wan2.1_i2v_720p_14B_fp8_e4m3fn download on a consumer card)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from parallel_cases import FIXTURE, write_fp8_dit

    from fantasytalking_core.loaders.wan_dit import stores_fp8

    import shutil

    shutil.copy(FIXTURE / "dit" / "config.json", tmp_path / "config.json")  # the tiny DiT's architecture
    fp8_file = write_fp8_dit(tmp_path)
    adapter = str(FIXTURE / "dit" / "fantasytalking.safetensors")
    assert stores_fp8(fp8_file) and not stores_fp8(FIXTURE / "dit" / "dit.safetensors")
    block = "transformer.blocks.0.ffn.net.0.proj.weight"
    as_stored = ModelSource(fp8_file, adapter, None, torch.bfloat16).load().state_dict()
    assert as_stored[block].dtype == torch.float8_e4m3fn
    assert as_stored["transformer.proj_out.weight"].dtype == torch.bfloat16  # only the block linears are fp8
    widened = ModelSource(fp8_file, adapter, torch.bfloat16, torch.bfloat16).load().state_dict()
    assert widened[block].dtype == torch.bfloat16  # asked for: as before
    plain = ModelSource(str(FIXTURE / "dit" / "dit.safetensors"), adapter, None, torch.bfloat16).load().state_dict()
    assert plain[block].dtype == torch.bfloat16
