"""The official adapter file and its safetensors repack load identically; anything that does not fit is refused."""

import pytest
import torch
from safetensors.torch import save_file

from fantasytalking_core.errors import ModelFileError
from fantasytalking_core.loaders.adapter import load_audio_adapter, read_audio_adapter
from fantasytalking_core.loaders.wan_dit import load_wan_dit
from model_files import OFFICIAL, flat_adapter

CONFIG = OFFICIAL / "dit" / "config.json"


def fresh_dit():
    return load_wan_dit(OFFICIAL / "dit" / "dit.safetensors", config=CONFIG)


@pytest.fixture(scope="module")
def official_adapter():
    return torch.load(OFFICIAL / "dit" / "fantasytalking.ckpt", weights_only=True)


def test_ckpt_and_safetensors_load_the_same_weights_into_the_right_places(official_adapter):
    a = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", fresh_dit())
    b = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.safetensors", fresh_dit())
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    proc = official_adapter["audio_processor"]
    assert torch.equal(sa["transformer.blocks.1.attn2.processor.audio.v_proj.weight"],
                       proc["blocks.1.cross_attn.processor.v_proj.weight"])
    assert torch.equal(sa["audio_proj.proj.weight"], official_adapter["proj_model"]["proj.weight"])


def _write(tmp_path, adapter):
    path = tmp_path / "adapter.safetensors"
    save_file(flat_adapter(adapter), str(path))
    return path


def test_missing_block_is_an_error(tmp_path, official_adapter):
    adapter = {"proj_model": official_adapter["proj_model"],
               "audio_processor": {k: v for k, v in official_adapter["audio_processor"].items() if not k.startswith("blocks.1.cross_attn.processor.k")}}
    with pytest.raises(ModelFileError, match=r"no k/v for blocks \[1\]"):
        load_audio_adapter(_write(tmp_path, adapter), fresh_dit())


def test_adapter_for_more_blocks_is_an_error(tmp_path, official_adapter):
    proc = dict(official_adapter["audio_processor"])
    proc["blocks.2.cross_attn.processor.k_proj.weight"] = proc["blocks.0.cross_attn.processor.k_proj.weight"].clone()
    proc["blocks.2.cross_attn.processor.v_proj.weight"] = proc["blocks.0.cross_attn.processor.v_proj.weight"].clone()
    with pytest.raises(ModelFileError, match="DiT has 2"):
        load_audio_adapter(_write(tmp_path, {"proj_model": official_adapter["proj_model"], "audio_processor": proc}), fresh_dit())


def test_wrong_width_is_an_error(tmp_path, official_adapter):
    proc = {k: torch.zeros(128, 32) for k in official_adapter["audio_processor"]}
    with pytest.raises(ModelFileError, match=r"needs \(64, 32\)"):
        load_audio_adapter(_write(tmp_path, {"proj_model": official_adapter["proj_model"], "audio_processor": proc}), fresh_dit())


def test_unexpected_key_is_an_error(tmp_path, official_adapter):
    adapter = {"proj_model": {**official_adapter["proj_model"], "extra.weight": torch.zeros(2)},
               "audio_processor": official_adapter["audio_processor"]}
    with pytest.raises(ModelFileError, match=r"unexpected tensor\(s\) in the file, e.g. 'proj_model.extra.weight'"):
        load_audio_adapter(_write(tmp_path, adapter), fresh_dit())


def test_a_dit_given_as_adapter_is_refused():
    with pytest.raises(ModelFileError, match="not an audio adapter"):
        load_audio_adapter(OFFICIAL / "dit" / "dit.safetensors", fresh_dit())


def test_read_without_a_dit_takes_sizes_from_the_file_and_keeps_the_stored_dtype(official_adapter):
    adapter = read_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt")
    proc = official_adapter["audio_processor"]
    num_layers = len(proc) // 2
    assert len(adapter.blocks) == num_layers and adapter.dim == proc["blocks.0.cross_attn.processor.k_proj.weight"].shape[0]
    assert torch.equal(adapter.blocks[num_layers - 1].v_proj.weight,
                       proc[f"blocks.{num_layers - 1}.cross_attn.processor.v_proj.weight"])
    assert torch.equal(adapter.proj.proj.weight, official_adapter["proj_model"]["proj.weight"])
    assert not any(p.is_meta or p.requires_grad for p in adapter.parameters())
    with pytest.raises(ModelFileError, match="DiT has 7"):
        read_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", num_layers=7)
    with pytest.raises(ModelFileError, match="model width 24"):
        read_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", dim=24)


def test_the_engine_uses_the_adapter_blocks_it_was_read_into(official_adapter):
    """One copy of the k/v: the processors own the adapter's block modules (offloading moves them with the block)."""
    model = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", fresh_dit())
    kv = model.transformer.blocks[1].attn2.processor.audio
    assert torch.equal(kv.k_proj.weight, official_adapter["audio_processor"]["blocks.1.cross_attn.processor.k_proj.weight"])
    assert model.transformer.blocks[0].attn2.processor.audio is not kv
