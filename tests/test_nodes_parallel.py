"""nodes/parallel.py: the sampler's ``parallel`` input, refused in one line before any worker starts."""

from __future__ import annotations

import pytest
import torch

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.pipeline import GenerationSettings
from nodes.parallel import check_parallel_text, sampler_pool

CPU = torch.device("cpu")


def test_the_layout_text_is_checked_for_its_form():
    assert check_parallel_text("") is None and check_parallel_text("  ") is None
    assert check_parallel_text("cfg=3,ulysses=2") is None
    assert check_parallel_text("cfg=two") == ("FantasyTalking Sampler: parallel 'cfg=two': cfg needs a whole "
                                              "number of processes, got 'two'.")
    assert "unknown axis 'gpus'" in check_parallel_text("gpus=4")


def test_no_layout_means_no_pool(tiny_model):
    assert sampler_pool(tiny_model, "", CPU, GenerationSettings()) is None


@pytest.mark.parametrize("text, settings, message", [
    ("cfg=4", GenerationSettings(), "a step of this run has at most 3 guidance passes to spread, so cfg can be at "
                                    "most 3"),
    ("cfg=3", GenerationSettings(cfg=1.0), "at most 2 guidance passes"),
    ("ulysses=2", GenerationSettings(), "ring/ulysses split the video tokens over GPUs; on the CPU use cfg=N"),
    ("cfg=2", GenerationSettings(), "this model did not come from FantasyTalking Model Loader"),
    ("ring=2", GenerationSettings(), "which attention 'sdpa' does not return; use attention flash or sage"),
])
def test_a_layout_this_run_cannot_use_is_refused_before_any_worker_starts(tiny_model, text, settings, message):
    with pytest.raises(SettingsError, match="^FantasyTalking Sampler: parallel ") as refused:
        sampler_pool(tiny_model, text, CPU, settings)
    assert message in str(refused.value) and "--" not in str(refused.value)  # the node's inputs, not the CLI's flags


@pytest.fixture
def loaded_model(official_dir):
    """The fixture's DiT loaded from its files, as the Model Loader node loads it (it has a source)."""
    from fantasytalking_core.loaders.model_source import ModelSource

    return ModelSource(str(official_dir / "dit" / "dit.safetensors"),
                       str(official_dir / "dit" / "fantasytalking.ckpt"), None, torch.float32).load()


class StartedPool:
    """Stands in for SamplerPool: records how the node would start it."""

    alive = True

    def __init__(self, layout, load, device_type, backend, keep_on_device):
        self.layout, self.keep_on_device = layout, keep_on_device

    def close(self):
        self.alive = False


@pytest.mark.parametrize("offload_blocks, gpu_memory_gb, keeps", [(False, 0.0, True), (True, 0.0, False),
                                                                  (False, 24.0, False)])
def test_each_worker_follows_the_one_gpu_memory_options(loaded_model, monkeypatch, offload_blocks, gpu_memory_gb,
                                                        keeps):
    """offload_blocks / gpu_memory_gb: the workers keep their DiT on the CPU and place it per clip (streamed, or
    as the budget allows); without them it waits on each worker's GPU."""
    import nodes.parallel

    monkeypatch.setattr(nodes.parallel, "SamplerPool", lambda *args, **kw: StartedPool(*args, **kw))
    try:
        pool = sampler_pool(loaded_model, "cfg=2", CPU, GenerationSettings(), "processes", offload_blocks,
                            gpu_memory_gb, (81, 512, 512))
        assert pool.keep_on_device is keeps
    finally:
        nodes.parallel.close_sampler_pool()


def test_the_workers_go_when_their_model_is_dropped_and_stay_for_a_reload_of_the_same_files(official_dir,
                                                                                            monkeypatch):
    """ComfyUI's "Free model and node cache" drops the loaded model: its pool's workers (and their GPU memory) go
    with it. A pool reused for the same files loaded again follows the new model, not the dropped one; a LoRA
    node's model (a new object over the same weights) dropped when the LoRA changes leaves the pool."""
    import gc

    import nodes.parallel
    from fantasytalking_core.loaders.model_source import ModelSource

    source = ModelSource(str(official_dir / "dit" / "dit.safetensors"),
                         str(official_dir / "dit" / "fantasytalking.ckpt"), None, torch.float32)
    monkeypatch.setattr(nodes.parallel, "SamplerPool", lambda *args, **kw: StartedPool(*args, **kw))
    try:
        first = source.load()
        pool = sampler_pool(first, "cfg=2", CPU, GenerationSettings())
        again = source.load()  # the same files, loaded anew after a cache reset
        assert sampler_pool(again, "cfg=2", CPU, GenerationSettings()) is pool
        del first
        gc.collect()
        assert pool.alive and nodes.parallel._pool is not None  # the model it serves now is still there
        with_lora = again.with_loras([])  # a LoRA node's model: a new object over the same weights
        assert sampler_pool(with_lora, "cfg=2", CPU, GenerationSettings()) is pool
        del with_lora  # the LoRA changed: ComfyUI drops that object, the weights stay loaded
        gc.collect()
        assert pool.alive
        del again
        gc.collect()
        assert not pool.alive and nodes.parallel._pool is None
    finally:
        nodes.parallel.close_sampler_pool()


def test_offload_blocks_with_fsdp_is_refused_in_the_nodes_words(loaded_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)  # as PyTorch for Linux with CUDA
    with pytest.raises(SettingsError, match=r"^FantasyTalking Sampler: parallel cfg=1,ring=1,ulysses=2,fsdp: fsdp "
                                            r"already splits the weights .* turn off offload_blocks, or leave out"):
        sampler_pool(loaded_model, "ulysses=2,fsdp", torch.device("cuda"), GenerationSettings(), "processes", True)


def test_gpu_workers_without_nccl_are_refused_before_any_worker_starts(loaded_model, monkeypatch):
    """PyTorch for Windows has no NCCL: two GPUs of this machine cannot form a process group."""
    import nodes.parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    monkeypatch.setattr(nodes.parallel, "SamplerPool", None)  # starting workers would fail the test
    with pytest.raises(SettingsError, match=r"^FantasyTalking Sampler: Several GPUs need NCCL, which this PyTorch "
                                            r"build lacks .* or on one GPU without a parallel layout\.$"):
        sampler_pool(loaded_model, "cfg=2", torch.device("cuda"), GenerationSettings())


def test_a_budget_that_even_streaming_exceeds_is_refused_before_any_worker_starts(loaded_model, monkeypatch):
    import nodes.parallel
    from fantasytalking_core.runtime.memory import InsufficientMemoryError

    monkeypatch.setattr(nodes.parallel, "SamplerPool", None)  # starting workers would fail the test
    with pytest.raises(InsufficientMemoryError, match=r"^FantasyTalking Sampler: parallel cfg=2,ring=1,ulysses=1: "
                                                      r"Even streaming the DiT's blocks this run needs about 0\.5\d GiB"
                                                      r" of GPU memory, more than the 0.5 GiB budget"):
        sampler_pool(loaded_model, "cfg=2", CPU, GenerationSettings(), "processes", False, 0.5, (81, 512, 512))


def test_ray_workers_without_the_ray_package_are_refused_in_one_line(loaded_model, monkeypatch):
    from fantasytalking_core.errors import MissingDependencyError

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as where ray is not installed
    with pytest.raises(MissingDependencyError, match=r"^FantasyTalking Sampler: the ray worker pool needs the ray "
                                                     r"package \(pip install ray\)"):
        sampler_pool(loaded_model, "cfg=2", CPU, GenerationSettings(), "ray")


def test_tokens_the_sequence_ranks_cannot_split_are_refused_before_any_worker_starts(loaded_model, monkeypatch):
    # 720x720 is 45 x 45 patches a frame: 21 latent frames of them are 42,525 tokens, odd. The DiT refused it at
    # its first forward, after every worker had loaded the model
    import nodes.parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with 2 GPUs and NCCL
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(nodes.parallel, "SamplerPool", None)  # starting workers would fail the test
    with pytest.raises(SettingsError, match=r"^FantasyTalking Sampler: parallel cfg=1,ring=1,ulysses=2: 81 frames at "
                                            r"720x720 are 42525 video tokens, which the 2 ring x ulysses ranks cannot "
                                            r"split evenly \(2025 per latent frame\)"):
        sampler_pool(loaded_model, "ulysses=2", torch.device("cuda"), GenerationSettings(), video=(81, 720, 720))


def test_workers_that_together_exceed_the_ram_are_refused_before_any_starts(loaded_model, monkeypatch):
    # each worker checked the RAM for its own copy while the others loaded theirs: together they ran out
    from types import SimpleNamespace

    import psutil

    import nodes.parallel
    from fantasytalking_core.loaders.wan_dit import loaded_bytes
    from fantasytalking_core.runtime.memory import InsufficientMemoryError

    one = loaded_bytes(loaded_model.source.dit, loaded_model.source.weight_dtype, loaded_model.source.compute_dtype)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(1.5 * one)))  # one copy fits
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    monkeypatch.setattr(nodes.parallel, "SamplerPool", None)  # starting workers would fail the test
    with pytest.raises(InsufficientMemoryError, match=r"^FantasyTalking Sampler: parallel cfg=2,ring=1,ulysses=1: 2 "
                                                      r"workers, each loading dit\.safetensors, needs about"):
        sampler_pool(loaded_model, "cfg=2", CPU, GenerationSettings())
