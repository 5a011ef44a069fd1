"""CLIP ViT-H/14 image encoder: official parity, Wan and ComfyUI layouts, strict loading, preprocessing."""

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from fantasytalking_core.errors import ImageInputError, ModelFileError
from fantasytalking_core.encoders.image import clip_config, encode_image_clip, load_image_encoder
from model_files import OFFICIAL, parity_tol

CLIP = OFFICIAL / "clip"
CONFIG = CLIP / "config.json"
LAYERS, WIDTH = 3, 16


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(CLIP / "clip_io.safetensors")


@pytest.fixture(scope="module")
def wan_state() -> dict[str, torch.Tensor]:
    return torch.load(CLIP / "clip.pth", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return load_image_encoder(CLIP / "clip.pth", CONFIG)


def _uint8_to_unit(image_hwc: torch.Tensor) -> torch.Tensor:
    """8-bit HWC -> [1, 3, H, W] in [-1, 1], as the official BasePipeline.preprocess_image."""
    return (image_hwc.float() * (2 / 255) - 1).permute(2, 0, 1)[None]


def _comfy_layout(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clip_vision_h.safetensors key names, written out by hand (independent of the loader's table)."""
    v = "vision_model."
    out = {
        v + "embeddings.class_embedding": wan["visual.cls_embedding"].flatten(),
        v + "embeddings.patch_embedding.weight": wan["visual.patch_embedding.weight"],
        v + "embeddings.position_embedding.weight": wan["visual.pos_embedding"][0],
        v + "pre_layrnorm.weight": wan["visual.pre_norm.weight"],
        v + "pre_layrnorm.bias": wan["visual.pre_norm.bias"],
        # ComfyUI's file has a real post-norm and projection; neither may touch the penultimate output
        v + "post_layernorm.weight": torch.randn(WIDTH),
        v + "post_layernorm.bias": torch.randn(WIDTH),
        "visual_projection.weight": wan["visual.head"].t().contiguous(),
    }
    for i in range(LAYERS):
        src, dst = f"visual.transformer.{i}.", f"{v}encoder.layers.{i}."
        for p in ("weight", "bias"):
            q, k, vv = wan[f"{src}attn.to_qkv.{p}"].split(WIDTH)
            out[f"{dst}self_attn.q_proj.{p}"], out[f"{dst}self_attn.k_proj.{p}"] = q, k
            out[f"{dst}self_attn.v_proj.{p}"] = vv
            out[f"{dst}self_attn.out_proj.{p}"] = wan[f"{src}attn.proj.{p}"]
            out[f"{dst}layer_norm1.{p}"] = wan[f"{src}norm1.{p}"]
            out[f"{dst}layer_norm2.{p}"] = wan[f"{src}norm2.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = wan[f"{src}mlp.0.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = wan[f"{src}mlp.2.{p}"]
    return {k: t.contiguous() for k, t in out.items()}


# ---------------------------------------------------------------- parity with the official encoder


def test_wan_layout_matches_official_penultimate(model, io):
    out = encode_image_clip(model, io["image"])  # 48x48 frame, squashed to 224x224 inside
    assert out.shape == io["penultimate"].shape == (1, 257, WIDTH)
    torch.testing.assert_close(out, io["penultimate"], rtol=0, atol=parity_tol(io["penultimate"]))


def test_uint8_image_matches_official_penultimate224(model, io):
    out = encode_image_clip(model, _uint8_to_unit(io["image224_uint8_hwc"]))
    torch.testing.assert_close(out, io["penultimate224"], rtol=0, atol=parity_tol(io["penultimate224"]))


def test_penultimate_is_not_the_last_block_or_post_norm(model, io):
    pixels = torch.nn.functional.interpolate(io["image"], size=(224, 224), mode="bicubic", align_corners=False)
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=(pixels * 0.5 + 0.5 - mean) / std, output_hidden_states=True)
    tol = parity_tol(io["penultimate"])
    assert (out.hidden_states[-1] - io["penultimate"]).abs().max() > tol  # all blocks: wrong
    assert (out.last_hidden_state - io["penultimate"]).abs().max() > tol
    assert (out.hidden_states[-2] - io["penultimate"]).abs().max() < tol


def test_antialiased_resize_would_fail_parity(model, io, monkeypatch):
    # Wan resizes with F.interpolate's default (no antialias); the fixture is sensitive to the difference.
    import fantasytalking_core.encoders.image as mod

    plain = torch.nn.functional.interpolate
    monkeypatch.setattr(mod.F, "interpolate", lambda *a, **k: plain(*a, **k, antialias=True))
    assert (encode_image_clip(model, io["image"]) - io["penultimate"]).abs().max() > parity_tol(io["penultimate"])


# ---------------------------------------------------------------- file layouts


def test_comfy_layout_matches_official(tmp_path, wan_state, io):
    save_file(_comfy_layout(wan_state), tmp_path / "clip_vision_h.safetensors")
    model = load_image_encoder(tmp_path / "clip_vision_h.safetensors", CONFIG)
    torch.testing.assert_close(encode_image_clip(model, io["image"]), io["penultimate"],
                               rtol=0, atol=parity_tol(io["penultimate"]))


def test_comfy_fp16_file_loads_as_fp16_with_exact_weights(tmp_path, wan_state, io):
    state = {k: t.half() for k, t in _comfy_layout(wan_state).items()}
    save_file(state, tmp_path / "clip_vision_h_fp16.safetensors")
    model = load_image_encoder(tmp_path / "clip_vision_h_fp16.safetensors", CONFIG)
    assert model.dtype == torch.float16
    loaded = {("vision_model." + k if not k.startswith("vision_model.") else k): t
              for k, t in model.state_dict().items()}
    for key, value in state.items():
        if key != "visual_projection.weight":
            assert torch.equal(loaded[key], value), key
    as_fp32 = load_image_encoder(tmp_path / "clip_vision_h_fp16.safetensors", CONFIG, dtype=torch.float32)
    out = encode_image_clip(as_fp32, io["image"])  # fp16-rounded weights: close, not bit-equal
    torch.testing.assert_close(out, io["penultimate"], rtol=0, atol=0.05 * io["penultimate"].abs().max().item())


def test_diffsynth_prefixed_wan_file(tmp_path, wan_state, io):
    torch.save({f"model.{k}": v for k, v in wan_state.items() if k != "log_scale"}, tmp_path / "clip.pth")
    model = load_image_encoder(tmp_path / "clip.pth", CONFIG)
    torch.testing.assert_close(encode_image_clip(model, io["image"]), io["penultimate"],
                               rtol=0, atol=parity_tol(io["penultimate"]))


# ---------------------------------------------------------------- strict loading and wrong files


def test_dit_file_is_rejected_with_what_it_is():
    with pytest.raises(ModelFileError, match="not a CLIP vision model") as err:
        load_image_encoder(OFFICIAL / "dit" / "dit.safetensors", CONFIG)
    assert "DiT" in str(err.value) and "clip_vision_h" in str(err.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, wan_state):
    state = dict(wan_state)
    del state["visual.transformer.2.attn.to_qkv.bias"]
    state["visual.transformer.3.norm1.weight"] = torch.ones(WIDTH)  # a 4th block the config does not have
    torch.save(state, tmp_path / "clip.pth")
    with pytest.raises(ModelFileError) as err:
        load_image_encoder(tmp_path / "clip.pth", CONFIG)
    msg = str(err.value)
    assert "'visual.transformer.2.attn.to_qkv.bias'" in msg and "'visual.transformer.3.norm1.weight'" in msg


def test_file_of_another_width_is_a_size_error():
    # e.g. clip_vision_l chosen instead of clip_vision_h: layout fine, widths wrong
    with pytest.raises(ModelFileError, match=r"wrong size.*'visual.patch_embedding.weight' is \[16, 3, 14, 14\]"):
        load_image_encoder(CLIP / "clip.pth", {"vision_dim": 32, "vision_layers": LAYERS, "vision_heads": 2,
                                              "vision_mlp_ratio": 4})


# ---------------------------------------------------------------- config and inputs


def test_bundled_config_is_vit_h_14():
    cfg = clip_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (
        1280, 5120, 16, 32)
    assert (cfg.patch_size, cfg.image_size, cfg.hidden_act, cfg.layer_norm_eps) == (14, 224, "gelu", 1e-5)
    assert cfg.image_mean == [0.48145466, 0.4578275, 0.40821073]
    with init_empty_weights():
        params = sum(p.numel() for p in CLIPVisionModel(cfg).parameters())
    assert 630e6 < params < 633e6  # ViT-H/14 vision tower
    tiny = clip_config(CONFIG)  # Wan's names
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_hidden_layers) == (16, 64, 3)


def test_image_input_checks(model):
    with pytest.raises(ImageInputError, match="channels-last"):
        encode_image_clip(model, torch.zeros(1, 48, 48, 3))
    with pytest.raises(ImageInputError, match=r"\[-1, 1\]"):
        encode_image_clip(model, torch.full((1, 3, 48, 48), 255.0))
    assert encode_image_clip(model, torch.zeros(3, 40, 64)).shape == (1, 257, WIDTH)  # [3,H,W], any size
