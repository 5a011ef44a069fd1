"""fantasytalking_core.loaders.lora: Wan LoRAs in the formats users have act as the merged weights would, at their
strength, for one run only; a LoRA that does not fit the DiT is refused, never silently ignored."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
from fantasytalking_core.errors import ModelFileError
from fantasytalking_core.loaders.lora import applied_loras, read_wan_lora
from fantasytalking_core.model.adapter import AudioConditioning
from fantasytalking_core.model.precision import linear_fp32
from fantasytalking_core.parity import load_fixture_model
from fantasytalking_core.runtime.placement import dit_on_device
from model_files import OFFICIAL

RANK, ALPHA = 4, 8.0
DIM, FFN = 64, 128  # the tiny fixture DiT
# original Wan module -> diffusers module, (in, out) of its Linear
TARGETS = {
    "blocks.{i}.self_attn.q": ("blocks.{i}.attn1.to_q", DIM, DIM),
    "blocks.{i}.cross_attn.k_img": ("blocks.{i}.attn2.add_k_proj", DIM, DIM),
    "blocks.{i}.cross_attn.v_img": ("blocks.{i}.attn2.add_v_proj", DIM, DIM),
    "blocks.{i}.ffn.0": ("blocks.{i}.ffn.net.0.proj", DIM, FFN),
}


def kijai_lora(path, seed=0, blocks=(0, 1), with_head=True):
    """A ComfyUI/kijai-format Wan LoRA: lora_down/lora_up/alpha per module, diff_b on the FFN, and the head; returns
    the path and the merged float32 deltas {diffusers module: (dW [out, in], db [out] or None)} at strength 1."""
    gen = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    modules = [(w.format(i=i), d.format(i=i), n_in, n_out) for i in blocks for w, (d, n_in, n_out) in TARGETS.items()]
    if with_head:
        modules.append(("head.head", "proj_out", DIM, 64))  # out: patch 1x2x2 x 16 channels
    for wan, ours, n_in, n_out in modules:
        down = torch.randn(RANK, n_in, generator=gen) * 0.1
        up = torch.randn(n_out, RANK, generator=gen) * 0.1
        state[f"diffusion_model.{wan}.lora_down.weight"] = down
        state[f"diffusion_model.{wan}.lora_up.weight"] = up
        scale = 1.0
        if wan != "head.head":  # the head's update carries no alpha in these files (diffusers' conversion)
            state[f"diffusion_model.{wan}.alpha"] = torch.tensor(ALPHA)
            scale = ALPHA / RANK
        bias = None
        if wan.endswith("ffn.0"):
            bias = torch.randn(n_out, generator=gen) * 0.1
            state[f"diffusion_model.{wan}.diff_b"] = bias
        deltas[ours] = (scale * up @ down, bias)
    save_file(state, path)
    return path, deltas


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return kijai_lora(tmp_path_factory.mktemp("lora") / "talk_lora.safetensors")


def velocity(model, x):
    windows = audio_windows_for_frames(x["audio_features"].shape[1], 17)
    with torch.no_grad():
        audio = gather_audio_windows(model.project_audio(x["audio_features"]), windows)
        return model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"],
                     AudioConditioning(audio, windows.k_lens_tensor(), 1.0))


def merged_model(deltas, strength):
    model = load_fixture_model(OFFICIAL, "dit.safetensors", "fantasytalking.ckpt")
    with torch.no_grad():
        for name, (dw, db) in deltas.items():
            layer = model.transformer.get_submodule(name)
            layer.weight += strength * dw
            if db is not None:
                layer.bias += strength * db
    return model


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_a_kijai_lora_acts_as_its_merged_weights_at_its_strength(tiny_model, official_inputs, lora_file, strength):
    path, deltas = lora_file
    keys_before = set(tiny_model.transformer.state_dict())
    plain = velocity(tiny_model, official_inputs)
    model = tiny_model.with_loras([read_wan_lora(path, strength)])
    assert tiny_model.loras == ()  # the loaded model stays LoRA-free (ComfyUI caches it)
    with dit_on_device(model, torch.device("cpu")):
        with_lora = velocity(model, official_inputs)
    expected = velocity(merged_model(deltas, strength), official_inputs)
    torch.testing.assert_close(with_lora, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert (with_lora - plain).abs().max() > 1e-2 * plain.abs().max()  # it did something
    # afterwards: the original modules and output again
    assert set(tiny_model.transformer.state_dict()) == keys_before
    assert torch.equal(velocity(tiny_model, official_inputs), plain)


def test_strength_zero_is_no_change(tiny_model, official_inputs, lora_file):
    model = tiny_model.with_loras([read_wan_lora(lora_file[0], 0.0)])
    plain = velocity(tiny_model, official_inputs)
    with dit_on_device(model, torch.device("cpu")):
        assert torch.equal(velocity(model, official_inputs), plain)


def test_lora_on_a_float32_island_layer_is_applied_in_float32():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.time_proj = torch.nn.Linear(16, 32).to(torch.bfloat16)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["time_proj"], init_lora_weights=False),
                            holder)
    layer = holder.time_proj
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    base = layer.base_layer
    want = x @ (base.weight.float() + 2.0 * b @ a).t() + base.bias.float()  # scaling alpha / r = 2
    torch.testing.assert_close(linear_fp32(layer, x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(linear_fp32(base, x), want, atol=1e-3)  # the island does not drop the update


def test_a_lora_for_another_model_is_refused(tmp_path, tiny_model):
    state = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}
    save_file(state, tmp_path / "wan14b_lora.safetensors")
    model = tiny_model.with_loras([read_wan_lora(tmp_path / "wan14b_lora.safetensors")])
    with pytest.raises(ModelFileError, match="match no layer of this DiT.*input 5120"):
        with dit_on_device(model, torch.device("cpu")):
            pass
    assert not any("lora" in k for k in tiny_model.transformer.state_dict())
    deep, _ = kijai_lora(tmp_path / "deep.safetensors", blocks=(0, 7), with_head=False)  # the tiny DiT has 2 blocks
    with pytest.raises(ModelFileError, match="blocks.7"):
        with applied_loras(tiny_model.transformer, [read_wan_lora(deep)], torch.float32):
            pass


def test_files_that_are_no_wan_lora_are_refused(tmp_path):
    save_file({"diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, tmp_path / "full.safetensors")
    with pytest.raises(ModelFileError, match="full.safetensors"):
        read_wan_lora(tmp_path / "full.safetensors")


def test_whole_weight_differences_are_read_when_zero_and_refused_otherwise(tmp_path):
    # diffusers' conversion drops norm and other whole-weight .diff entries with an info line; a file whose dropped
    # entries are not zero was once applied in part, without a word
    path, _ = kijai_lora(tmp_path / "base.safetensors", blocks=(0,), with_head=False)
    state = dict(load_file(path))
    zeros = {"diffusion_model.blocks.0.norm3.diff": torch.zeros(DIM),
             "diffusion_model.blocks.0.self_attn.norm_q.diff_b": torch.zeros(DIM),
             "diffusion_model.patch_embedding.diff": torch.zeros(DIM, 36, 1, 2, 2)}
    save_file({**state, **zeros}, tmp_path / "zeros.safetensors")
    assert read_wan_lora(tmp_path / "zeros.safetensors").state_dict.keys() == read_wan_lora(path).state_dict.keys()
    for key, tensor in zeros.items():
        save_file({**state, **zeros, key: tensor + 0.01}, tmp_path / "diff.safetensors")
        with pytest.raises(ModelFileError, match=r"changes 1 weights as a whole \(e.g. " + key.replace(".", r"\.")
                           + r"\).*core LoraLoaderModelOnly"):
            read_wan_lora(tmp_path / "diff.safetensors")


def test_fp8_weights_keep_the_lora_in_the_compute_dtype(tmp_path, lora_file):
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.loaders.state_dict import open_checkpoint
    from fantasytalking_core.loaders.wan_dit import load_wan_dit
    from model_files import save_wan_file, to_fp8_scaled

    state = dict(open_checkpoint(OFFICIAL / "dit" / "dit.safetensors").items())
    path = save_wan_file(to_fp8_scaled(state), tmp_path / "fp8_scaled.safetensors")
    dit = load_wan_dit(path, config=OFFICIAL / "dit" / "config.json", fp8_storage=True, compute_dtype=torch.bfloat16)
    model = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt", dit).with_loras([read_wan_lora(lora_file[0])])
    with applied_loras(model.transformer, model.loras, model.dtype):
        q = model.transformer.blocks[0].attn1.to_q
        assert q.base_layer.weight.dtype == torch.float8_e4m3fn
        lora_params = {n: p for n, p in model.transformer.named_parameters() if ".lora_" in n}
        assert lora_params and all(p.dtype == model.dtype for p in lora_params.values())  # the compute dtype
        read = model.loras[0].state_dict["transformer.blocks.0.attn1.to_q.lora_A.weight"]
        assert torch.equal(q.lora_A["talk_lora"].weight, read.to(model.dtype))  # as read, not rounded to fp8
        x = torch.randn(2, 8, DIM, dtype=model.dtype)
        want = q.base_layer(x) + q.lora_B["talk_lora"](q.lora_A["talk_lora"](x)) * q.scaling["talk_lora"]
        torch.testing.assert_close(q(x), want)


def test_a_lora_acts_on_gguf_weights(tmp_path, lora_file, official_inputs):
    from fantasytalking_core.loaders.adapter import load_audio_adapter
    from fantasytalking_core.loaders.state_dict import open_checkpoint
    from fantasytalking_core.loaders.wan_dit import load_wan_dit
    from model_files import write_gguf

    path = tmp_path / "q8.gguf"
    write_gguf(dict(open_checkpoint(OFFICIAL / "dit" / "dit.safetensors").items()), path)
    gguf = load_audio_adapter(OFFICIAL / "dit" / "fantasytalking.ckpt",
                              load_wan_dit(path, config=OFFICIAL / "dit" / "config.json", compute_dtype=torch.float32))
    q = gguf.transformer.blocks[0].attn1.to_q
    assert hasattr(q.weight, "quant_type")  # quantized blocks, dequantized per call
    plain = velocity(gguf, official_inputs)
    model = gguf.with_loras([read_wan_lora(lora_file[0], 1.0)])
    with dit_on_device(model, torch.device("cpu")):
        with_lora = velocity(model, official_inputs)
    # the LoRA's effect on the quantized model is its effect on the float32 one, up to the quantization error
    float32 = load_fixture_model(OFFICIAL, "dit.safetensors", "fantasytalking.ckpt")
    effect = velocity(merged_model(lora_file[1], 1.0), official_inputs) - velocity(float32, official_inputs)
    assert ((with_lora - plain) - effect).norm() < 0.1 * effect.norm()
    assert hasattr(gguf.transformer.blocks[0].attn1.to_q.weight, "quant_type")  # the GGUF layer is back
