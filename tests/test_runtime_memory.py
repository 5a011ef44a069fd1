"""The GPU memory estimate: calibrated on the H100 figures, and a run that cannot fit is refused before it starts."""

import pytest
import torch

from fantasytalking_core.model.transformer import build_transformer, resolve_config
from fantasytalking_core.runtime import memory
from fantasytalking_core.runtime.memory import (GIB, InsufficientMemoryError, MemoryEstimate, check_gpu_memory,
                                                estimate_dit_memory, video_tokens)


@pytest.fixture(scope="module")
def dit_14b():
    """The real 14B architecture on the meta device (no memory), weights counted in bf16."""
    return build_transformer(resolve_config("wan2.1_i2v_14b_720p"), empty=True).to(torch.bfloat16)


def test_video_tokens_of_the_benchmark_sizes():
    assert video_tokens(81, 512, 512) == 21 * 32 * 32 == 21504
    assert video_tokens(81, 720, 1280) == 21 * 45 * 80 == 75600


def test_the_14b_estimate_matches_the_h100_measurements(dit_14b):
    """docs/benchmarks.md, H100: weights 32.2 GiB (DiT + adapter, the adapter ~1.6 of it); peak 34.6 GiB for one
    pass at 512x512x81, 39.2 with the 3 passes batched, 40.3 at 720x1280x81; streamed 4.4 GiB."""
    one = estimate_dit_memory(dit_14b, 81, 512, 512)
    assert 30.0 < one.weights / GIB < 31.5  # without the adapter's k/v
    assert 2.0 < one.activations / GIB < 2.6  # measured 2.3
    assert 6.5 < estimate_dit_memory(dit_14b, 81, 512, 512, batch_rows=3).activations / GIB < 7.5  # measured 6.9
    assert 7.5 < estimate_dit_memory(dit_14b, 81, 720, 1280).activations / GIB < 8.6  # measured 8.0
    streamed = estimate_dit_memory(dit_14b, 81, 512, 512, placement="streamed")
    assert 1.0 < streamed.weights / GIB < 2.5 and streamed.total / GIB < 5.5  # measured peak 4.4


def test_the_step_cache_counts_its_residuals(dit_14b):
    # two float32 [21504, 5120] tensors per cached pass (420 MiB each) and two per batch row while storing
    plain = estimate_dit_memory(dit_14b, 81, 512, 512)
    cached = estimate_dit_memory(dit_14b, 81, 512, 512, cached_passes=3)
    assert cached.activations - plain.activations == 21504 * 5120 * 4 * 2 * (3 + 1)
    assert 3.2 < (cached.activations - plain.activations) / GIB < 3.4


def test_a_run_that_cannot_fit_is_refused_with_the_options(monkeypatch):
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device: (22 * GIB, 24 * GIB))
    monkeypatch.setattr(memory.torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    big = MemoryEstimate(weights=int(32.3 * GIB), activations=int(2.3 * GIB))
    with pytest.raises(InsufficientMemoryError) as refused:
        check_gpu_memory(big, torch.device("cuda", 0), "81 frames at 512x512")
    text = str(refused.value)
    assert "RTX 4090 has 22.0 GiB free" in text and "81 frames at 512x512" in text and "\n" not in text
    assert all(option in text for option in ("--fp8", "GGUF", "--offload-blocks", "smaller image size", "fewer frames"))
    check_gpu_memory(MemoryEstimate(weights=int(17 * GIB), activations=int(2.3 * GIB)), torch.device("cuda", 0), "x")
    check_gpu_memory(big, torch.device("cpu"), "x")  # only CUDA devices are checked


def test_a_memory_budget_picks_resident_streamed_or_refuses(dit_14b):
    """The 14B DiT at 512x512x81 needs ~33 GiB resident (without the adapter) and ~5 GiB streamed."""
    from fantasytalking_core.runtime.memory import choose_placement

    assert choose_placement(dit_14b, 81, 512, 512, budget_gib=48)[0] == "resident"
    assert choose_placement(dit_14b, 81, 512, 512, budget_gib=24)[0] == "streamed"  # a 24 GB card
    assert choose_placement(dit_14b, 81, 512, 512, budget_gib=24, batch_rows=3)[0] == "streamed"
    with pytest.raises(InsufficientMemoryError,
                       match=r"more than the 3 GiB budget: a larger budget \(if the GPU has the room\), a smaller image size"):
        choose_placement(dit_14b, 81, 512, 512, budget_gib=3)


def test_the_pipeline_runs_where_the_budget_says(monkeypatch):
    """check_dit_fits returns the placement the run will use: the budget overrides the one asked for."""
    from types import SimpleNamespace

    from fantasytalking_core.pipeline import GenerationSettings, check_dit_fits

    dit = SimpleNamespace(transformer=build_transformer(resolve_config("wan2.1_i2v_14b_720p"), empty=True),
                          dtype=torch.bfloat16)
    settings = GenerationSettings()
    assert check_dit_fits(dit, torch.device("cpu"), 81, 512, 512, settings, "streamed", gpu_memory=200) == "resident"
    assert check_dit_fits(dit, torch.device("cpu"), 81, 512, 512, settings, "resident", gpu_memory=24) == "streamed"
    assert check_dit_fits(dit, torch.device("cpu"), 81, 512, 512, settings, "streamed") == "streamed"


def test_a_parallel_process_needs_its_share_of_the_tokens_and_with_fsdp_of_the_blocks(dit_14b):
    """ulysses/ring over 2 ranks: half the activations each, the weights whole; fsdp over 2: every weight halved,
    plus three blocks whole (the one that runs, the prefetched one's all-gather output and copy) and the
    embeddings and head whole."""
    one = estimate_dit_memory(dit_14b, 81, 720, 1280)
    split = estimate_dit_memory(dit_14b, 81, 720, 1280, sequence=2)
    assert split.weights == one.weights and split.activations == one.activations // 2  # 75,600 tokens split evenly
    sharded = estimate_dit_memory(dit_14b, 81, 720, 1280, placement="sharded", sequence=2)
    blocks = sum(memory.parameter_bytes(b) for b in dit_14b.blocks)
    block = memory.parameter_bytes(dit_14b.blocks[0])
    rest = one.weights - blocks
    assert sharded.weights == rest + (rest + blocks) // 2 + 3 * block
    assert 17.5 < sharded.weights / GIB < 18.5  # ~30.6 GiB of which ~29.1 in the 40 blocks of 0.73
    assert sharded.activations == split.activations


def test_weights_already_on_the_gpu_count_as_free(monkeypatch):
    """A pool worker's DiT waits on its GPU between runs: that memory is the run's own, not taken."""
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device: (4 * GIB, 80 * GIB))
    monkeypatch.setattr(memory.torch.cuda, "get_device_name", lambda device: "NVIDIA H100")
    run = MemoryEstimate(weights=32 * GIB, activations=2 * GIB)
    check_gpu_memory(run, torch.device("cuda", 0), "x", present=32 * GIB)
    with pytest.raises(InsufficientMemoryError, match="H100 has 8.0 GiB free"):
        check_gpu_memory(run, torch.device("cuda", 0), "x", present=4 * GIB)


def test_the_check_of_a_parallel_run_is_one_process_share():
    """check_dit_fits with a layout: cfg=3 with batched passes holds one pass per process; a budget that one
    process cannot meet with all 3 passes batched is met; fsdp picks the sharded placement, and streaming blocks
    as well is refused (a budget picks the placement, so it is not)."""
    from types import SimpleNamespace

    from fantasytalking_core.errors import SettingsError
    from fantasytalking_core.pipeline import GenerationSettings, check_dit_fits
    from fantasytalking_core.runtime.parallel import NODE_NAMES, ParallelLayout

    dit = SimpleNamespace(transformer=build_transformer(resolve_config("wan2.1_i2v_14b_720p"), empty=True).to(
        torch.bfloat16), dtype=torch.bfloat16)
    cpu, batched = torch.device("cpu"), GenerationSettings(batch_passes=True)
    # resident at 720x1280x81: ~30.6 GiB weights + 8.0 GiB per pass batched
    assert check_dit_fits(dit, cpu, 81, 720, 1280, batched, gpu_memory=42) == "streamed"  # 3 rows: ~55 GiB
    assert check_dit_fits(dit, cpu, 81, 720, 1280, batched, gpu_memory=42, layout=ParallelLayout(cfg=3)) == "resident"
    assert check_dit_fits(dit, cpu, 81, 720, 1280, batched, gpu_memory=42,
                          layout=ParallelLayout(cfg=3, ulysses=2, fsdp=True)) == "sharded"
    with pytest.raises(InsufficientMemoryError, match="With its weights sharded this run needs about"):
        check_dit_fits(dit, cpu, 81, 720, 1280, batched, gpu_memory=16, layout=ParallelLayout(ulysses=2, fsdp=True))
    with pytest.raises(SettingsError, match="fsdp already splits the weights over the GPUs, so the blocks do not "
                                            "also stream; turn off --offload-blocks"):
        check_dit_fits(dit, cpu, 81, 720, 1280, batched, "streamed", layout=ParallelLayout(ulysses=2, fsdp=True))
    with pytest.raises(SettingsError, match="^parallel cfg=1,ring=1,ulysses=2,fsdp: .* turn off offload_blocks"):
        check_dit_fits(dit, cpu, 81, 720, 1280, batched, "streamed", layout=ParallelLayout(ulysses=2, fsdp=True),
                       names=NODE_NAMES)  # in the sampler node's words
    assert check_dit_fits(dit, cpu, 81, 720, 1280, batched, "streamed", gpu_memory=80,
                          layout=ParallelLayout(ulysses=2, fsdp=True)) == "sharded"


def test_a_refusal_names_the_options_of_the_run_that_cost_memory():
    # the refusal listed fp8, GGUF, streaming, the size and the frames, never the run's own batch_passes and
    # step_cache, which the user had turned on
    from types import SimpleNamespace

    from fantasytalking_core.pipeline import GenerationSettings, check_dit_fits
    from fantasytalking_core.runtime.parallel import NODE_NAMES

    dit = SimpleNamespace(transformer=build_transformer(resolve_config("wan2.1_i2v_14b_720p"), empty=True).to(
        torch.bfloat16), dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    costly = GenerationSettings(batch_passes=True, step_cache=0.1)
    with pytest.raises(InsufficientMemoryError, match=r"budget.*Less memory too: leave out --batch-passes \(the passes one "
                                                      r"after another\) and --step-cache 0 \(no stored residuals\)\.$"):
        check_dit_fits(dit, cpu, 81, 720, 1280, costly, gpu_memory=4)
    with pytest.raises(InsufficientMemoryError, match=r"Less memory too: step_cache 0 \(no stored residuals\)\.$"):
        check_dit_fits(dit, cpu, 81, 720, 1280, GenerationSettings(step_cache=0.1), gpu_memory=4, names=NODE_NAMES)
    with pytest.raises(InsufficientMemoryError) as plain:
        check_dit_fits(dit, cpu, 81, 720, 1280, GenerationSettings(), gpu_memory=4)
    assert "Less memory too" not in str(plain.value)


def test_a_budget_runs_the_passes_one_after_another_where_that_keeps_the_dit_whole():
    # batched passes pushed a 36 GiB budget into streaming the blocks (13-27% slower on an H100/H200) where the
    # passes one after another kept the DiT whole; batching gained nothing there
    from types import SimpleNamespace

    from fantasytalking_core.pipeline import GenerationSettings, budget_settings, check_dit_fits
    from fantasytalking_core.runtime.parallel import ParallelLayout

    dit = SimpleNamespace(transformer=build_transformer(resolve_config("wan2.1_i2v_14b_720p"), empty=True).to(
        torch.bfloat16), dtype=torch.bfloat16)
    batched = GenerationSettings(batch_passes=True)

    def run(gpu_memory, settings=batched, layout=None):
        fitted = budget_settings(dit, 81, 512, 512, settings, gpu_memory, layout)
        return fitted.batch_passes, check_dit_fits(dit, torch.device("cpu"), 81, 512, 512, fitted,
                                                   gpu_memory=gpu_memory, layout=layout)

    assert run(36) == (False, "resident")  # 30.5 GiB + 2.3 a pass: whole only one after another
    assert run(48) == (True, "resident")  # room for the batch: as asked
    assert run(24) == (True, "streamed")  # streamed either way: a batch fetches each block once for its passes
    assert run(None) == (True, "resident")  # no budget: as asked
    assert run(36, GenerationSettings()) == (False, "resident")
    assert run(36, layout=ParallelLayout(cfg=3)) == (True, "resident")  # one pass per process: nothing to batch


def test_bytes_on_a_device_count_only_what_is_there():
    """(Sharded weights count their local shard: the fsdp cases of test_runtime_parallel.py measure with it.)"""
    from fantasytalking_core.runtime.memory import bytes_on

    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert bytes_on(layer, torch.device("cpu")) == (64 * 32 + 32) * 2
    assert bytes_on(layer, torch.device("meta")) == 0


@pytest.fixture
def allocator_calls(monkeypatch):
    """A CUDA build of PyTorch with no allocator setting of the user's; the settings the code passes, recorded."""
    calls = []
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    for name in memory.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_a_cuda_run_gets_expandable_segments(allocator_calls):
    # fixed segments left 3 GiB reserved but unused under a 12 GiB cap and the streamed 720p pass ran out (H200)
    assert memory.use_expandable_segments(torch.device("cuda:0"))
    assert allocator_calls == ["expandable_segments:True"]


@pytest.mark.parametrize("name", memory.ALLOCATOR_ENV)
def test_the_users_allocator_setting_is_kept(allocator_calls, monkeypatch, name):
    monkeypatch.setenv(name, "backend:cudaMallocAsync")
    assert not memory.use_expandable_segments(torch.device("cuda"))
    assert allocator_calls == []


def test_cpu_runs_and_cpu_builds_leave_the_allocator_alone(allocator_calls, monkeypatch):
    assert not memory.use_expandable_segments(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm or CPU build: no CUDA caching allocator to set
    assert not memory.use_expandable_segments(torch.device("cuda"))
    assert allocator_calls == []
