import pytest
import torch
from safetensors.torch import save_file

from fantasytalking_core.errors import ModelFileError
from fantasytalking_core.loaders.state_dict import flatten_state_dict, open_checkpoint, strip_prefix


def test_lists_shapes_and_dtypes_without_reading(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "y": torch.ones(2)}, str(path))
    ckpt = open_checkpoint(path)
    assert ckpt.shapes == {"x.weight": (3, 4), "y": (2,)}
    assert ckpt.dtypes == {"x.weight": torch.bfloat16, "y": torch.float32}
    assert ckpt.tensor("y", torch.float16).dtype == torch.float16


def test_nested_pickles_are_flattened(tmp_path):
    path = tmp_path / "n.ckpt"
    torch.save({"a": {"b": torch.ones(1), "c": {"d": torch.zeros(2)}}}, path)
    assert open_checkpoint(path).keys == ["a.b", "a.c.d"]
    with pytest.raises(ModelFileError, match="Expected a state dict"):
        flatten_state_dict({"a": 3})


def test_fp8_scaled_hides_scales_and_dequantizes(tmp_path):
    w = torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)
    path = tmp_path / "s.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "l.weight": w, "l.scale_weight": torch.tensor([0.5]),
               "l.scale_input": torch.tensor([1.0])}, str(path))
    ckpt = open_checkpoint(path)
    assert ckpt.keys == ["l.weight"] and ckpt.is_fp8_scaled
    assert ckpt.tensor("l.weight").tolist() == [[0.5, -1.0]]


def test_strip_prefix_needs_every_key():
    assert strip_prefix(["model.diffusion_model.a", "model.diffusion_model.b"], ("model.diffusion_model.",))[0] == "model.diffusion_model."
    assert strip_prefix(["model.diffusion_model.a", "b"], ("model.diffusion_model.",))[0] == ""


@pytest.mark.parametrize("content", [b"hello, not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_unreadable_pickles_are_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a readable torch checkpoint"):
        open_checkpoint(path)


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"weight_map": [1]}', b"\xff\xfe\x00 binary", b'{"other": {}}',
                                     b'{"weight_map": {"blocks.0.w": 3}}'])
def test_a_shard_index_that_is_not_one_is_a_clear_error(tmp_path, content):
    """Not JSON, not text, or JSON of another layout: a ModelFileError naming the file, never a TypeError."""
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"model\.safetensors\.index\.json is not a safetensors shard index"):
        open_checkpoint(path)
