"""Every DiT file format users have loads to the same model; wrong files are refused with what they are."""

import json

import pytest
import torch

from fantasytalking_core.errors import ModelFileError, ModelNotFoundError
from fantasytalking_core.loaders.state_dict import open_checkpoint
from fantasytalking_core.loaders.wan_dit import FP8Linear, load_wan_dit
from fantasytalking_core.model.transformer import resolve_config
from model_files import (OFFICIAL, TINY_WAN, dequantized_fp8_scaled, save_wan_file, to_fp8_scaled, write_gguf,
                         write_shards)

CONFIG = OFFICIAL / "dit" / "config.json"
DIT = OFFICIAL / "dit" / "dit.safetensors"


@pytest.fixture(scope="module")
def wan_state():
    ckpt = open_checkpoint(DIT)
    return dict(ckpt.items())


@pytest.fixture(scope="module")
def reference():
    return load_wan_dit(DIT, config=CONFIG).state_dict()


def dit_forward(model, x):
    """The plain Wan I2V forward (no adapter) of a loaded transformer on the official inputs."""
    with torch.no_grad():
        return model(torch.cat([x["x"], x["y"]], 1), x["timestep"], torch.nn.functional.pad(x["context_pos"], (0, 0, 0, 501)),
                     encoder_hidden_states_image=x["clip_feature"], return_dict=False)[0]


def assert_same(model, reference, dtype=None):
    state = model.state_dict()
    assert set(state) == set(reference)
    for k, v in reference.items():
        expected = v if dtype is None else v.to(dtype)
        assert torch.equal(state[k].to(expected.dtype), expected), k


def test_original_and_comfy_layouts_equal(tmp_path, wan_state, reference):
    comfy = save_wan_file(wan_state, tmp_path / "wan_comfy.safetensors", prefix="model.diffusion_model.")
    assert_same(load_wan_dit(comfy, config=CONFIG), reference)
    pth = tmp_path / "wan.pth"
    torch.save(wan_state, pth)
    assert_same(load_wan_dit(pth, config=CONFIG), reference)


def test_shard_set_by_index_by_shard_and_by_folder(tmp_path, wan_state, reference):
    index = write_shards(wan_state, tmp_path / "Wan2.1-I2V-14B-480P", 7)
    assert len(list(index.parent.glob("*.safetensors"))) == 7
    assert_same(load_wan_dit(index, config=CONFIG), reference)
    assert_same(load_wan_dit(index.parent / "diffusion_pytorch_model-00003-of-00007.safetensors", config=CONFIG), reference)
    # the original release folder carries Wan's own config.json
    (index.parent / "config.json").write_text(CONFIG.read_text())
    assert_same(load_wan_dit(index.parent), reference)


def test_incomplete_shard_set_is_refused(tmp_path, wan_state):
    index = write_shards(wan_state, tmp_path / "w", 3)
    (index.parent / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        load_wan_dit(index, config=CONFIG)


def test_diffusers_folder(tmp_path, reference):
    model = load_wan_dit(DIT, config=CONFIG)
    model.save_pretrained(tmp_path / "diffusers")
    assert_same(load_wan_dit(tmp_path / "diffusers"), reference)


def test_half_precision_files_and_dtype_option(tmp_path, wan_state, reference):
    fp16 = save_wan_file({k: v.half() for k, v in wan_state.items()}, tmp_path / "wan_fp16.safetensors")
    model = load_wan_dit(fp16, config=CONFIG)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # diffusers keeps modulation in fp32
    torch.testing.assert_close(model.blocks[0].attn1.to_q.weight.float(),
                               reference["blocks.0.attn1.to_q.weight"].half().float(), rtol=0, atol=0)
    bf16 = load_wan_dit(DIT, config=CONFIG, dtype=torch.bfloat16)
    assert bf16.blocks[1].ffn.net[2].weight.dtype == torch.bfloat16


def test_fp8_file_upcasts_by_default_and_keeps_fp8_storage_when_asked(tmp_path, wan_state, official_inputs):
    fp8_state = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v for k, v in wan_state.items()}
    path = save_wan_file(fp8_state, tmp_path / "wan_fp8_e4m3fn.safetensors")
    upcast = load_wan_dit(path, config=CONFIG, compute_dtype=torch.float32)
    assert upcast.blocks[0].attn1.to_q.weight.dtype == torch.float32
    stored = load_wan_dit(path, config=CONFIG, fp8_storage=True, compute_dtype=torch.float32)
    q = stored.blocks[0].attn1.to_q
    assert isinstance(q, FP8Linear) and q.weight.dtype == torch.float8_e4m3fn and q.bias.dtype == torch.float32
    torch.testing.assert_close(dit_forward(upcast, official_inputs), dit_forward(stored, official_inputs), rtol=1e-5, atol=1e-5)


def test_fp8_scaled_is_dequantized_with_its_scales(tmp_path, wan_state):
    scaled = to_fp8_scaled(wan_state)
    path = save_wan_file(scaled, tmp_path / "wan_fp8_scaled.safetensors", prefix="model.diffusion_model.")
    model = load_wan_dit(path, config=CONFIG, dtype=torch.float32)
    want = dequantized_fp8_scaled(scaled)["blocks.1.cross_attn.k.weight"]
    got = model.blocks[1].attn2.to_k.weight
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    raw = scaled["blocks.1.cross_attn.k.weight"].float()
    assert (raw - got).abs().max() > 10 * got.abs().max()  # reading it as plain fp8 would be badly wrong
    # and it approximates the original weights to fp8 precision
    torch.testing.assert_close(got, wan_state["blocks.1.cross_attn.k.weight"], rtol=0.07, atol=1e-3)


def test_gguf_loads_quantized_layers_close_to_float(tmp_path, wan_state, reference, official_inputs):
    path = tmp_path / "wan2.1-i2v-14b-480p-Q8_0.gguf"
    write_gguf(wan_state, path)
    model = load_wan_dit(path, config=CONFIG, compute_dtype=torch.float32)
    assert type(model.blocks[0].attn1.to_q).__name__ == "GGUFLinear"
    ref_model = load_wan_dit(DIT, config=CONFIG)
    a, b = dit_forward(ref_model, official_inputs), dit_forward(model, official_inputs)
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # Q8_0 rounding only


def _without_image_branch(state, in_channels):
    out = {k: v for k, v in state.items() if not any(s in k for s in ("img_emb", "k_img", "v_img", "norm_k_img"))}
    w = out["patch_embedding.weight"]
    out["patch_embedding.weight"] = torch.zeros(w.shape[0], in_channels, *w.shape[2:])
    return out


@pytest.mark.parametrize("kind,in_channels,message", [
    ("t2v", 16, "T2V"),
    ("wan22", 36, "Wan2.2"),
])
def test_other_wan_models_are_refused(tmp_path, wan_state, kind, in_channels, message):
    path = save_wan_file(_without_image_branch(wan_state, in_channels), tmp_path / f"{kind}.safetensors")
    with pytest.raises(ModelFileError, match=message):
        load_wan_dit(path, config=CONFIG)


def test_other_size_is_refused_against_the_14b_config(tmp_path, wan_state):
    path = save_wan_file(wan_state, tmp_path / "small.safetensors")  # no config.json beside it
    with pytest.raises(ModelFileError, match=r"dim 64, 2 blocks.*Wan2.1-I2V-14B.*dim 5120"):
        load_wan_dit(path)  # no config: the bundled 14B one


@pytest.mark.parametrize("file,message", [
    ("vae/vae.pth", "VAE"), ("t5/t5.pth", "text encoder"), ("clip/clip.pth", "CLIP image encoder"),
    ("dit/fantasytalking.ckpt", "audio adapter"),
])
def test_non_dit_files_are_named(file, message):
    with pytest.raises(ModelFileError, match=message):
        load_wan_dit(OFFICIAL / file, config=CONFIG)


def test_missing_and_unexpected_keys_are_errors(tmp_path, wan_state):
    missing = {k: v for k, v in wan_state.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(ModelFileError, match=r"1 tensor\(s\) missing from the file, e.g. 'blocks.1.ffn.net.2.bias'"):
        load_wan_dit(save_wan_file(missing, tmp_path / "m.safetensors"), config=CONFIG)
    extra = {**wan_state, "blocks.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ModelFileError, match=r"1 unexpected tensor\(s\) in the file, e.g. 'blocks.0.extra.weight'"):
        load_wan_dit(save_wan_file(extra, tmp_path / "e.safetensors"), config=CONFIG)
    wrong = {**wan_state, "head.head.bias": torch.zeros(3)}
    with pytest.raises(ModelFileError, match=r"wrong size: 'proj_out.bias' is \[3\] in the file, the model needs \[64\]"):
        load_wan_dit(save_wan_file(wrong, tmp_path / "w.safetensors"), config=CONFIG)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="diffusion_models"):
        load_wan_dit(tmp_path / "nope.safetensors", config=CONFIG)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_wan_dit(bad, config=CONFIG)
    with pytest.raises(ModelFileError, match="Unsupported model file type"):
        load_wan_dit(OFFICIAL / "inputs.json", config=CONFIG)


def test_config_from_wan_terms_matches_dict(tmp_path):
    assert resolve_config(CONFIG) == resolve_config(json.loads(CONFIG.read_text())) == resolve_config(dict(TINY_WAN))


def test_fp8_scaled_can_stay_fp8_with_its_scales(tmp_path, wan_state, official_inputs):
    scaled = to_fp8_scaled(wan_state)
    path = save_wan_file(scaled, tmp_path / "wan_fp8_scaled.safetensors", prefix="model.diffusion_model.")
    dequant = load_wan_dit(path, config=CONFIG, dtype=torch.float32)
    kept = load_wan_dit(path, config=CONFIG, fp8_storage=True, compute_dtype=torch.float32)
    k = kept.blocks[1].attn2.to_k
    assert isinstance(k, FP8Linear) and k.weight.dtype == torch.float8_e4m3fn
    assert k.scale_weight.item() == scaled["blocks.1.cross_attn.k.scale_weight"].item() != 1.0
    torch.testing.assert_close(dit_forward(dequant, official_inputs), dit_forward(kept, official_inputs), rtol=1e-5, atol=1e-5)


def test_a_file_inside_a_model_folder_uses_the_folder_config(tmp_path, wan_state, reference):
    folder = tmp_path / "wan2.1_i2v_14b_small"
    folder.mkdir()
    path = save_wan_file(wan_state, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match="dim 5120"):  # no config: the bundled 14B one refuses it
        load_wan_dit(path)
    (folder / "config.json").write_text(CONFIG.read_text())
    assert_same(load_wan_dit(path), reference)
    (folder / "config.json").write_text('{"something": "else"}')  # not a DiT config: ignored
    with pytest.raises(ModelFileError, match="dim 5120"):
        load_wan_dit(path)
    (folder / "config.json").write_text('{"dim": 64, "num_heads"')  # cut short: an error naming it, no fallback
    with pytest.raises(ModelFileError, match=r"Cannot read .*wan2.1_i2v_14b_small/config.json"):
        load_wan_dit(path)
    assert_same(load_wan_dit(path, config=CONFIG), reference)  # an explicit config does not read the broken one


def test_gguf_and_fp8_dits_take_the_adapter_and_run_with_audio(tmp_path, wan_state, official_inputs):
    from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.model.adapter import AudioConditioning

    gguf_path = tmp_path / "q8.gguf"
    write_gguf(wan_state, gguf_path)
    fp8_path = save_wan_file(to_fp8_scaled(wan_state), tmp_path / "fp8_scaled.safetensors")
    x = official_inputs
    windows = audio_windows_for_frames(36, 17)
    outs = []
    for dit in (load_wan_dit(DIT, config=CONFIG), load_wan_dit(gguf_path, config=CONFIG, compute_dtype=torch.float32),
                load_wan_dit(fp8_path, config=CONFIG, fp8_storage=True, compute_dtype=torch.float32)):
        model = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", dit)
        assert model.dtype == torch.float32 and model.audio_proj.proj.weight.dtype == torch.float32
        with torch.no_grad():
            audio = gather_audio_windows(model.project_audio(x["audio_features"]), windows)
            outs.append(model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"],
                              AudioConditioning(audio, windows.k_lens_tensor(), 1.0)))
    for out in outs[1:]:
        assert (out - outs[0]).abs().max() < 0.1 * outs[0].abs().max()  # quantization error only


def test_gguf_dtype_sets_the_unquantized_weights_and_compute(tmp_path, wan_state):
    path = tmp_path / "q8.gguf"
    write_gguf(wan_state, path)
    model = load_wan_dit(path, config=CONFIG, dtype=torch.bfloat16)
    assert model.patch_embedding.weight.dtype == torch.bfloat16  # stored flattened, restored to its 5-D shape
    assert model.patch_embedding.weight.shape == wan_state["patch_embedding.weight"].shape
    assert model.blocks[0].attn1.to_q.compute_dtype == torch.bfloat16
