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


@pytest.mark.parametrize("offload_blocks, gpu_memory_gb", [(True, 0.0), (False, 24.0)])
def test_one_gpu_memory_options_are_refused_not_ignored(tiny_model, offload_blocks, gpu_memory_gb):
    with pytest.raises(SettingsError, match="each worker keeps its whole model on its GPU, so offload_blocks and "
                                            "gpu_memory_gb do not apply"):
        sampler_pool(tiny_model, "cfg=2", CPU, GenerationSettings(), "processes", offload_blocks, gpu_memory_gb)


def test_ray_workers_without_the_ray_package_are_refused_in_one_line(official_dir, monkeypatch):
    from fantasytalking_core.errors import MissingDependencyError
    from fantasytalking_core.loaders.model_source import ModelSource

    model = ModelSource(str(official_dir / "dit" / "dit.safetensors"), str(official_dir / "dit" / "fantasytalking.ckpt"),
                        None, torch.float32).load()
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as where ray is not installed
    with pytest.raises(MissingDependencyError, match=r"^FantasyTalking Sampler: the ray worker pool needs the ray "
                                                     r"package \(pip install ray\)"):
        sampler_pool(model, "cfg=2", CPU, GenerationSettings(), "ray")
