import json

import pytest
import torch

from fantasytalking_core.sampling.schedule import flow_match_sigmas, shift_sigmas, sigmas_to_timesteps


def test_four_step_schedule_equals_official(official_dir):
    ref = json.loads((official_dir / "sampling.json").read_text())
    sigmas = flow_match_sigmas(4, shift=5.0)
    assert sigmas[-1] == 0 and sigmas.dtype == torch.float32
    # linspace then three float32 ops: scalar and vectorised kernels (ATEN_CPU_CAPABILITY) may each round once
    # differently, so a few ulps (measured: 1 with the scalar kernel, 0 with AVX2/AVX-512); one step off is 3%.
    expected = torch.tensor(ref["sigmas"])
    torch.testing.assert_close(sigmas[:-1], expected, rtol=4 * 2.0**-23, atol=0)
    torch.testing.assert_close(sigmas_to_timesteps(sigmas[:-1]), torch.tensor(ref["timesteps"]), rtol=4 * 2.0**-23, atol=0)
    assert [s["sigma_next"] for s in ref["steps"]] == sigmas[1:].tolist()


def test_thirty_step_default_schedule_equals_official(official_dir):
    ref = json.loads((official_dir / "sampling.json").read_text())["reference_30_steps"]
    sigmas = flow_match_sigmas()  # defaults: 30 steps, shift 5
    assert len(sigmas) == 31
    # linspace then three float32 ops: scalar and vectorised kernels (ATEN_CPU_CAPABILITY) may each round once
    # differently, so a few ulps (measured: 1 with the scalar kernel, 0 with AVX2/AVX-512); one step off is 3%.
    expected = torch.tensor(ref["sigmas"])
    torch.testing.assert_close(sigmas[:-1], expected, rtol=4 * 2.0**-23, atol=0)
    torch.testing.assert_close(sigmas_to_timesteps(sigmas[:-1]), torch.tensor(ref["timesteps"]), rtol=4 * 2.0**-23, atol=0)


def test_shift_moves_steps_towards_noise():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert shift_sigmas(s, 5.0).tolist() == pytest.approx([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0])


@pytest.mark.parametrize("kwargs", [{"num_steps": 0}, {"denoising_strength": 0.0}, {"shift": 0.0}])
def test_schedule_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        flow_match_sigmas(**kwargs)
