"""loaders/model_source.py: a model's files and options, picklable, loaded the same way in any process."""

from __future__ import annotations

import pickle

import pytest
import torch

from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.loaders.model_source import ModelSource
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
    import shutil

    from parallel_cases import FIXTURE, write_fp8_dit

    from fantasytalking_core.loaders.wan_dit import stores_fp8

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


def test_the_ram_a_dit_takes_is_known_from_its_header(tmp_path):
    # the estimate the RAM check refuses with: the parameters a load really makes, however the file stores them
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from parallel_cases import FIXTURE, write_fp8_dit

    from fantasytalking_core.loaders.wan_dit import load_wan_dit, loaded_bytes, stores_fp8

    shutil.copy(FIXTURE / "dit" / "config.json", tmp_path / "config.json")
    fp8_file, plain = write_fp8_dit(tmp_path), str(FIXTURE / "dit" / "dit.safetensors")
    sizes = {}
    for path, weight_dtype in ((fp8_file, None), (plain, None), (plain, torch.float8_e4m3fn),
                               (fp8_file, torch.bfloat16)):
        dit = load_wan_dit(path, dtype=weight_dtype or torch.bfloat16, compute_dtype=torch.bfloat16,
                           fp8_storage=weight_dtype is None and stores_fp8(path))
        loaded = sum(p.numel() * p.element_size() for p in dit.parameters())
        sizes[path, weight_dtype] = estimate = loaded_bytes(path, weight_dtype, torch.bfloat16)
        assert 0.97 * loaded <= estimate <= loaded, (path, weight_dtype)  # the tiny model's buffers aside
    assert sizes[fp8_file, None] < sizes[plain, None] == sizes[fp8_file, torch.bfloat16]


def test_a_model_larger_than_the_free_ram_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    # past the RAM and swap the operating system ends ComfyUI without a word
    from types import SimpleNamespace

    import psutil

    from fantasytalking_core.loaders import wan_dit
    from fantasytalking_core.runtime.memory import GIB, InsufficientMemoryError

    files = make_tiny_models(tmp_path)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=24))
    monkeypatch.setattr(wan_dit, "load_wan_dit", lambda *a, **k: pytest.fail("no weight may be read"))
    with pytest.raises(InsufficientMemoryError, match=r"^The DiT wan2.1_i2v_14b_tiny needs about 0\.0 GiB of RAM, but "
                                                      r"this machine has 0\.0 GiB available and 0\.0 GiB of free swap: "
                                                      r"weight_dtype fp8_e4m3fn keeps it in 8 bits"):
        ModelSource(str(files.dit), str(files.adapter), None, torch.float32).load()
    with pytest.raises(InsufficientMemoryError, match="^Loading the models needs about .* --fp8 keeps the DiT in 8 bits"):
        load_models(files, compute_dtype=torch.float32)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=64 * GIB))
    monkeypatch.setattr(wan_dit, "load_wan_dit", lambda *a, **k: "loaded")  # room now: loading goes on
    with pytest.raises(Exception) as went_on:
        ModelSource(str(files.dit), str(files.adapter), None, torch.float32).load()
    assert not isinstance(went_on.value, InsufficientMemoryError)


def test_torchruns_processes_on_one_machine_are_counted_a_copy_each(tmp_path, monkeypatch):
    # torchrun --nproc-per-node 4: four copies of every model in RAM; one copy fitting is not enough
    from types import SimpleNamespace

    import psutil

    from fantasytalking_core.loaders import model_paths, wan_dit
    from fantasytalking_core.runtime.memory import InsufficientMemoryError

    files = make_tiny_models(tmp_path)
    others = (files.adapter, files.text_encoder, files.image_encoder, files.vae, files.wav2vec2)
    one = wan_dit.loaded_bytes(files.dit, None, torch.float32) + sum(model_paths._disk_bytes(p) for p in others)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(2.5 * one)))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    with pytest.raises(InsufficientMemoryError, match=r"^Loading the models in 4 processes on this machine \(one copy "
                                                      r"each\) needs about .* start fewer processes per machine "
                                                      r"\(torchrun --nproc-per-node\)"):
        load_models(files, compute_dtype=torch.float32, processes=4)
    assert load_models(files, compute_dtype=torch.float32, processes=2).dit is not None  # two copies fit
    # the other local ranks leave the check to the first (their view counts copies already being read)
    assert load_models(files, compute_dtype=torch.float32, processes=4, check_memory=False).dit is not None


def test_a_gguf_dit_counts_the_tensors_it_copies_out_of_the_file(tmp_path):
    # an F16 GGUF (city96 publishes one) is copied whole into RAM as bf16; a quantized one keeps its weights in the
    # memory-mapped file and copies only its float tensors
    import sys
    from pathlib import Path

    import gguf

    sys.path.insert(0, str(Path(__file__).parent))
    from model_files import write_gguf
    from parallel_cases import FIXTURE

    from fantasytalking_core.loaders.state_dict import open_checkpoint
    from fantasytalking_core.loaders.wan_dit import loaded_bytes

    state = dict(open_checkpoint(FIXTURE / "dit" / "dit.safetensors").items())
    write_gguf(state, tmp_path / "q8_0.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "f16.gguf"), "wan")
    for key, tensor in state.items():
        writer.add_tensor(key, tensor.float().numpy().astype("float16"))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    every = sum(t.numel() for t in state.values())
    assert loaded_bytes(tmp_path / "f16.gguf", None, torch.bfloat16) == 2 * every
    quantized = loaded_bytes(tmp_path / "q8_0.gguf", None, torch.bfloat16)
    assert 0 < quantized < every  # biases, norms and the weights Q8_0 cannot hold; not the 2-D block weights
