"""loaders/model_source.py: a model's files and options, picklable, loaded the same way in any process."""

from __future__ import annotations

import pickle

import torch

from fantasytalking_core.loaders.model_source import ModelSource
from fantasytalking_core.loaders.model_paths import load_models
from fantasytalking_core.tiny import make_tiny_models


def test_a_source_crosses_processes_and_loads_the_model_the_loader_loads(tmp_path):
    files = make_tiny_models(tmp_path)
    source = ModelSource(str(files.dit), str(files.adapter), None, torch.float32)
    copy = pickle.loads(pickle.dumps(source.load))()  # what a spawned worker runs
    assert copy.source == source and copy.with_loras([]).source == source
    assert copy.dtype == torch.float32
    reference = load_models(files, compute_dtype=torch.float32).dit  # the command line's loading
    assert reference.source is None  # not loaded from a source: a parallel sampler refuses it
    assert list(copy.state_dict()) == list(reference.state_dict())
    for (name, ours), theirs in zip(copy.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
