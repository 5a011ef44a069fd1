"""Wan2.1 VAE: official parity, file layouts, strict loading, I2V conditioning, tiling."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fantasytalking_core.errors import ImageInputError, ModelFileError
from fantasytalking_core.encoders.vae import (
    decode_latents,
    encode_video,
    first_frame_mask,
    image_to_video_condition,
    known_frames_condition,
    known_latents,
    latent_num_frames,
    load_vae,
    vae_config,
)
from model_files import OFFICIAL, parity_tol

VAE = OFFICIAL / "vae"
CONFIG = VAE / "config.json"


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(VAE / "vae_io.safetensors")


@pytest.fixture(scope="module")
def wan_state() -> dict[str, torch.Tensor]:
    return torch.load(VAE / "vae.pth", weights_only=True)


@pytest.fixture(scope="module")
def vae():
    return load_vae(VAE / "vae.pth", CONFIG)


# ---------------------------------------------------------------- parity with the official VAE


def test_encode_matches_official_normalized_mean(vae, io):
    latent = encode_video(vae, io["video"])
    assert latent.shape == io["latent_mean_normalized"].shape == (1, 16, 2, 2, 4)
    assert latent.dtype == torch.float32
    torch.testing.assert_close(latent, io["latent_mean_normalized"], rtol=0, atol=parity_tol(io["latent_mean_normalized"]))


def test_decode_matches_official_clamped_video(vae, io):
    video = decode_latents(vae, io["latent_mean_normalized"])
    assert video.shape == io["decoded"].shape == (1, 3, 5, 16, 32)
    torch.testing.assert_close(video, io["decoded"], rtol=0, atol=parity_tol(io["decoded"]))
    assert video.min() >= -1 and video.max() <= 1


def test_bundled_config_is_wan21_with_official_latent_tables(io):
    cfg = vae_config()
    assert (cfg["base_dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"]) == (96, 16, [1, 2, 4, 4], 2)
    assert cfg["temperal_downsample"] == [False, True, True] and cfg["attn_scales"] == []
    # the fixture stores the tables the official WanVideoVAE normalizes with
    assert torch.equal(torch.tensor(cfg["latents_mean"]), io["latent_mean_table"])
    assert torch.equal(torch.tensor(cfg["latents_std"]), io["latent_std_table"])
    assert vae_config(CONFIG)["base_dim"] == 4  # Wan's own name "dim"


# ---------------------------------------------------------------- file layouts


def test_comfy_bf16_safetensors_keeps_dtype_and_exact_weights(tmp_path, wan_state):
    state = {k: v.bfloat16() for k, v in wan_state.items()}
    save_file(state, tmp_path / "wan_2.1_vae.safetensors")
    vae = load_vae(tmp_path / "wan_2.1_vae.safetensors", CONFIG)
    assert vae.dtype == torch.bfloat16
    loaded = vae.state_dict()
    # two spot checks through the key conversion (encoder head, a decoder upsampler's time conv)
    assert torch.equal(loaded["encoder.conv_out.weight"], state["encoder.head.2.weight"])
    assert torch.equal(loaded["decoder.up_blocks.0.upsamplers.0.time_conv.weight"],
                       state["decoder.upsamples.3.time_conv.weight"])
    assert sum(t.numel() for t in loaded.values()) == sum(t.numel() for t in state.values())


@pytest.mark.parametrize("layout", ["diffsynth_prefix", "diffusers"])
def test_other_layouts_give_the_same_model(tmp_path, vae, wan_state, io, layout):
    if layout == "diffsynth_prefix":
        state = {f"model.{k}": v for k, v in wan_state.items()}  # DiffSynth's saved WanVideoVAE
    else:
        state = {k: v.contiguous() for k, v in vae.state_dict().items()}  # the -Diffusers repos' vae/ folder
    save_file(state, tmp_path / "vae.safetensors")
    other = load_vae(tmp_path / "vae.safetensors", CONFIG)
    torch.testing.assert_close(encode_video(other, io["video"]), io["latent_mean_normalized"],
                               rtol=0, atol=parity_tol(io["latent_mean_normalized"]))


# ---------------------------------------------------------------- strict loading and wrong files


def test_dit_file_is_rejected_with_what_it_is():
    with pytest.raises(ModelFileError, match="not a Wan2.1 VAE") as err:
        load_vae(OFFICIAL / "dit" / "dit.safetensors", CONFIG)
    assert "DiT" in str(err.value) and "wan_2.1_vae" in str(err.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, wan_state):
    state = dict(wan_state)
    del state["decoder.head.2.bias"]
    state["decoder.head.9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken_vae.pth")
    with pytest.raises(ModelFileError) as err:
        load_vae(tmp_path / "broken_vae.pth", CONFIG)
    msg = str(err.value)
    assert "broken_vae.pth" in msg and "decoder.conv_out.bias" in msg and "'decoder.head.9.weight'" in msg


def test_size_mismatch_names_shapes():
    with pytest.raises(ModelFileError, match=r"'encoder.conv1.weight' is \[4, 3, 3, 3, 3\] in the file"):
        load_vae(VAE / "vae.pth")  # bundled (real size) config, tiny file


def test_config_tables_must_match_z_dim():
    with pytest.raises(ModelFileError, match="latents_mean"):
        vae_config({"z_dim": 8})
    with pytest.raises(ModelFileError, match="Unknown"):
        vae_config({"dims": 4})


# ---------------------------------------------------------------- I2V conditioning


def test_first_frame_mask_layout():
    mask = first_frame_mask(num_frames=9, height=16, width=24)
    assert mask.shape == (4, 3, 2, 3)
    expected = torch.zeros(4, 3, 2, 3)
    expected[:, 0] = 1.0  # latent frame 0 = pixel frame 0 repeated 4x; frames 1..8 (unknown) fill the rest
    assert torch.equal(mask, expected)
    assert first_frame_mask(1, 8, 8).shape == (4, 1, 1, 1)
    assert latent_num_frames(81) == 21
    with pytest.raises(ValueError, match="4k\\+1"):
        first_frame_mask(8, 16, 16)


def test_image_to_video_condition(vae, io):
    image = io["video"][0, :, 0]  # [3, 16, 32]
    y = image_to_video_condition(vae, image, num_frames=9)
    assert y.shape == (1, 20, 3, 2, 4) and y.dtype == torch.float32
    assert torch.equal(y[0, :4], first_frame_mask(9, 16, 32))
    video = torch.zeros(1, 3, 9, 16, 32)
    video[0, :, 0] = image  # the image, then black frames
    torch.testing.assert_close(y[:, 4:], encode_video(vae, video), rtol=0, atol=1e-6)
    # the later frames are black, not copies of the image: their latents differ from a still video's
    still = encode_video(vae, image[None, :, None].expand(1, 3, 9, 16, 32).contiguous())
    assert (still[:, :, 1:] - y[:, 4:, 1:]).abs().max() > 0.1
    with pytest.raises(ImageInputError):
        image_to_video_condition(vae, image.permute(1, 2, 0), num_frames=9)


def test_known_latents_are_the_known_frames_own_latents(vae, io):
    """The causal VAE: the latents of 5 known frames inside a 13-frame conditioning equal those frames encoded
    alone (the black frames after them do not reach back); the next latent frame does see the black frames."""
    video = torch.rand(1, 3, 9, 16, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    known = video[0, :, :5]  # [3, 5, 16, 32]
    y = known_frames_condition(vae, known, num_frames=13)
    alone = encode_video(vae, known[None])  # [1, 16, 2, 2, 4]
    assert known_latents(y, 5).shape == alone.shape == (1, 16, 2, 2, 4)
    torch.testing.assert_close(known_latents(y, 5), alone, rtol=0, atol=1e-6)
    # one latent frame further the conditioning holds black frames, not the video's continuation
    assert (encode_video(vae, video)[:, :, 2] - y[:, 4:, 2]).abs().max() > 0.1
    assert torch.equal(known_latents(y, 1), y[:, 4:, :1])


def test_encode_rejects_bad_frame_counts_and_sizes(vae):
    with pytest.raises(ValueError, match="4k\\+1"):
        encode_video(vae, torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ImageInputError, match="multiples of 8"):
        encode_video(vae, torch.zeros(1, 3, 5, 12, 16))


# ---------------------------------------------------------------- tiling


def test_tiled_decode_assembles_tiles_and_restores_settings(vae):
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 2, 8, 12)
    untiled = decode_latents(vae, latents)
    tiled = decode_latents(vae, latents, tile_size=(32, 32), tile_stride=(24, 24))
    assert tiled.shape == untiled.shape == (1, 3, 5, 64, 96)
    assert not vae.use_tiling and vae.tile_sample_min_height == 256  # one call's settings do not leak
    # The top-left tile (latent 4x4) is never blended over: its 24x24 kept corner is that tile decoded alone.
    corner = decode_latents(vae, latents[..., :4, :4])
    torch.testing.assert_close(tiled[..., :24, :24], corner[..., :24, :24], rtol=0, atol=1e-5)
    assert (tiled - untiled).abs().max() > 1e-3  # so tiling really happened
    with pytest.raises(ValueError, match="multiples of 8"):
        decode_latents(vae, latents, tile_size=(30, 30))
