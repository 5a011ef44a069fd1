"""fantasytalking_core.runtime.placement: a model goes back where it waits, whatever happens on the device; the
DiT resident or streamed block by block (diffusers' group offloading)."""

import pytest
import torch

from fantasytalking_core.model.adapter import AudioConditioning
from fantasytalking_core.audio.windows import audio_windows_for_frames, gather_audio_windows
from fantasytalking_core.runtime.placement import dit_on_device, on_device, streamed_blocks


def test_on_device_moves_back_when_the_move_itself_fails():
    layer = torch.nn.Linear(2, 2)
    calls = []
    original = layer.to

    def failing_to(device, *a, **k):
        calls.append(str(device))
        if str(device) == "meta":
            raise RuntimeError("out of memory half-way")
        return original(device, *a, **k)

    layer.to = failing_to
    with pytest.raises(RuntimeError, match="half-way"):
        with on_device(layer, torch.device("meta")):
            pass
    assert calls == ["meta", "cpu"]


def _forward(model, x, audio):
    return model(x["x"], x["timestep"], x["context_pos"], x["clip_feature"], x["y"], audio)


def _hooked_modules(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
               and m._diffusers_hook.hooks)


@pytest.fixture(scope="module")
def audio(tiny_model, official_inputs):
    windows = audio_windows_for_frames(official_inputs["audio_features"].shape[1], 17)
    with torch.no_grad():
        tokens = gather_audio_windows(tiny_model.project_audio(official_inputs["audio_features"]), windows)
    return AudioConditioning(tokens, windows.k_lens_tensor(), 1.0)


def test_streamed_blocks_compute_the_same_velocity_and_leave_no_hooks(tiny_model, official_inputs, audio):
    with torch.no_grad():
        resident = _forward(tiny_model, official_inputs, audio)
        with streamed_blocks(tiny_model, torch.device("cpu")) as streamed:
            assert streamed.execution_device == torch.device("cpu")
            assert _hooked_modules(tiny_model.transformer) > len(tiny_model.transformer.blocks)  # blocks + root
            out = _forward(streamed, official_inputs, audio)
    assert torch.equal(out, resident)  # same weights, same maths: only where they wait changed
    assert _hooked_modules(tiny_model.transformer) == 0 and tiny_model.execution_device is None
    with torch.no_grad():
        assert torch.equal(_forward(tiny_model, official_inputs, audio), resident)  # the model is as it was


def test_hooks_are_removed_when_sampling_fails(tiny_model, official_inputs):
    with pytest.raises(RuntimeError, match="interrupted"):
        with streamed_blocks(tiny_model, torch.device("cpu")):
            raise RuntimeError("interrupted")
    assert _hooked_modules(tiny_model.transformer) == 0 and tiny_model.execution_device is None


def test_the_device_is_where_inputs_go_while_streaming(tiny_model):
    meta = torch.device("meta")  # stands in for a GPU: the inputs' device must follow the streaming target
    tiny_model.execution_device = meta
    try:
        assert tiny_model.device == meta
    finally:
        tiny_model.execution_device = None
    assert tiny_model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="placement"):
        with dit_on_device(tiny_model, torch.device("cpu"), "everywhere"):
            pass


def test_fp8_weights_are_refused_on_apples_gpus_before_they_move(tiny_model):
    """MPS has no float8: a DiT kept in fp8 stops with what to load instead, and nothing moved."""
    from fantasytalking_core.errors import SettingsError

    weight = next(tiny_model.transformer.parameters())
    kept = weight.data
    weight.data = kept.to(torch.float8_e4m3fn)
    try:
        with pytest.raises(SettingsError, match="fp8.*Apple's GPUs \\(MPS\\) cannot hold: load it with weight_dtype"):
            with dit_on_device(tiny_model, torch.device("mps")):
                pass
        assert weight.device.type == "cpu"
        with dit_on_device(tiny_model, torch.device("cpu")):  # fp8 on another device: as before
            pass
    finally:
        weight.data = kept
