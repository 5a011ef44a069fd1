"""fantasytalking_core.runtime.compile: regional torch.compile of the DiT blocks for one run: the same result as
eager (exactly with a capture-only backend, within float32 rounding with inductor), no recompiles across steps and
guidance passes, and eager blocks again afterwards."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from fantasytalking_core.runtime.compile import compiled_blocks
from fantasytalking_core.sampling.denoise import generate_latents
from fantasytalking_core.sampling.guidance import GuidanceConfig
from fantasytalking_core.sampling.schedule import flow_match_sigmas


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """A fresh inductor cache for this module: torch keys its precompiled C++ header by neither ATEN_CPU_CAPABILITY
    nor the CPU, so a cache filled under one capability fails to compile under another (seen: 'at::vec has not
    been declared' after switching to ATEN_CPU_CAPABILITY=default)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def settings(official_dir):
    return json.loads((official_dir / "sampling.json").read_text())


def sample(model, settings, x, steps=2, audio_scale=None, batch_passes=False, step_cache=0.0):
    # audio guidance on the second step only: both the 3-pass and the 2-pass step occur
    guidance = GuidanceConfig(settings["cfg_scale"], settings["audio_cfg_scale"], 0.5, 1.0)
    return generate_latents(model, x["context_pos"], x["context_neg"], x["clip_feature"], x["y"],
                            x["audio_features"][0], settings["num_frames"], guidance=guidance,
                            sigmas=flow_match_sigmas(steps, 5.0), seed=settings["seed"],
                            audio_scale=settings["audio_scale"] if audio_scale is None else audio_scale,
                            batch_passes=batch_passes, step_cache=step_cache)


def test_captured_blocks_give_the_eager_result_without_recompiling(tiny_model, official_inputs, settings):
    eager = sample(tiny_model, settings, official_inputs)
    torch._dynamo.reset()
    counters.clear()
    with compiled_blocks(tiny_model.transformer, backend="eager"):
        assert all("compute" in block.__dict__ for block in tiny_model.transformer.blocks)
        captured = sample(tiny_model, settings, official_inputs)
        graphs_first_run = counters["stats"]["unique_graphs"]
        # another audio strength and more steps: the same graphs serve (the scale is data, not a constant)
        sample(tiny_model, settings, official_inputs, steps=3, audio_scale=0.7)
        assert counters["stats"]["unique_graphs"] == graphs_first_run
    # every block and pass ran through the compiled blocks: audio on and off are the two graphs
    assert graphs_first_run == 2
    assert torch.equal(captured, eager)  # a capture-only backend runs the very same kernels
    assert not any("compute" in block.__dict__ for block in tiny_model.transformer.blocks)  # eager again
    # a later run (or a long recording's next segment) reuses the graphs: nothing is compiled again
    frames_before = counters["stats"]["calls_captured"]
    for _ in range(3):
        with compiled_blocks(tiny_model.transformer, backend="eager"):
            again = sample(tiny_model, settings, official_inputs)
    assert counters["stats"]["unique_graphs"] == graphs_first_run
    assert counters["stats"]["calls_captured"] == frames_before
    assert torch.equal(again, eager)


def test_blocks_are_eager_again_after_a_failed_run(tiny_model):
    with pytest.raises(RuntimeError, match="interrupted"):
        with compiled_blocks(tiny_model.transformer, backend="eager"):
            raise RuntimeError("interrupted")
    assert not any("compute" in block.__dict__ for block in tiny_model.transformer.blocks)


def test_disabled_is_a_no_op_and_backends_are_checked(tiny_model):
    with compiled_blocks(tiny_model.transformer, enabled=False):
        assert not any("compute" in block.__dict__ for block in tiny_model.transformer.blocks)
    with pytest.raises(ValueError, match="backend"):
        with compiled_blocks(tiny_model.transformer, backend="tensorrt"):
            pass


def test_inductor_blocks_match_eager_within_float32_rounding(tiny_model, official_inputs, settings):
    eager = sample(tiny_model, settings, official_inputs, batch_passes=True)
    torch._dynamo.reset()
    with compiled_blocks(tiny_model.transformer):  # the default backend, with generated kernels
        compiled = sample(tiny_model, settings, official_inputs, batch_passes=True)
    # fused kernels reorder float32 reductions: the fixtures' float32 parity bound (1e-4 of the output's range)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()
    assert not torch.equal(compiled, sample(tiny_model, settings, official_inputs, batch_passes=True, audio_scale=0.0))


def test_the_settings_compile_the_blocks_for_the_run_only(tiny_model, official_inputs, settings):
    from fantasytalking_core.errors import SettingsError
    from fantasytalking_core.pipeline import GenerationSettings, check_dit_fits, sample_latents

    x = official_inputs
    seen = []

    def progress(step, total):
        seen.append(all("compute" in b.__dict__ for b in tiny_model.transformer.blocks))

    run = GenerationSettings(steps=1, compile=True, cfg=1.0, audio_cfg=1.0)
    sample_latents(tiny_model, x["context_pos"], None, x["clip_feature"], x["y"], x["audio_features"][0],
                   settings["num_frames"], run, progress)
    assert seen == [True]
    assert not any("compute" in b.__dict__ for b in tiny_model.transformer.blocks)
    # fp8 matmuls on a model without fp8 weights: refused before anything moves, with the fix named
    with pytest.raises(SettingsError, match="fp8 storage"):
        check_dit_fits(tiny_model, torch.device("cpu"), 17, 64, 64, GenerationSettings(fp8_matmul=True))


def test_the_step_cache_decides_outside_the_compiled_blocks(tiny_model, official_inputs, settings):
    # a threshold that skips on the tiny model (its block-0 residual changes 0.26-0.43 per step) over 8 steps
    eager = sample(tiny_model, settings, official_inputs, steps=8, step_cache=0.5)
    assert not torch.equal(eager, sample(tiny_model, settings, official_inputs, steps=8))  # it skipped something
    torch._dynamo.reset()
    counters.clear()
    with compiled_blocks(tiny_model.transformer, backend="eager"):
        captured = sample(tiny_model, settings, official_inputs, steps=8, step_cache=0.5)
    assert torch.equal(captured, eager)
    assert counters["stats"]["unique_graphs"] == 2  # audio on / off: the per-block decisions compiled nothing
    assert sum(counters["graph_break"].values()) == 0


def test_compiling_for_a_gpu_without_triton_is_refused_up_front(monkeypatch):
    """inductor generates GPU code with Triton, which PyTorch for Windows lacks: refused before any model loads,
    in the words of the command line or of the node; the CPU (C++ code) and compile off need no Triton."""
    import importlib.util

    from fantasytalking_core.errors import MissingDependencyError
    from fantasytalking_core.runtime.compile import check_compile

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"^--compile on a GPU needs Triton, .*triton-windows\), or turn "
                                                     r"--compile off\.$"):
        check_compile(True, "cuda")
    with pytest.raises(MissingDependencyError, match="^compile on a GPU needs Triton"):
        check_compile(True, "cuda", "compile")
    check_compile(True, "cpu")
    check_compile(False, "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    check_compile(True, "cuda")  # a GPU with Triton compiles
