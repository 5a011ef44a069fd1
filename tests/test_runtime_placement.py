"""fantasytalking_core.runtime.placement: a model goes back where it waits, whatever happens on the device."""

import pytest
import torch

from fantasytalking_core.runtime.placement import on_device


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
