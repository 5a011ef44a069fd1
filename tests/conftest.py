from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"
OFFICIAL_BF16 = FIXTURES / "official_bf16"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """Golden data of the official FantasyTalking implementation (see tests/fixtures/official/README.md)."""
    return OFFICIAL


@pytest.fixture(scope="session")
def official_bf16_dir() -> Path:
    """The official bf16 precision set: head size 128, non-square latent (see tests/fixtures/official_bf16/README.md)."""
    return OFFICIAL_BF16


@pytest.fixture(scope="session")
def official_inputs() -> dict[str, torch.Tensor]:
    return load_file(OFFICIAL / "inputs.safetensors")


@pytest.fixture(scope="session")
def tiny_model():
    """The official fixture's tiny DiT + adapter, loaded in float32 by the package's own loaders."""
    from fantasytalking_core.parity import load_fixture_model

    return load_fixture_model(OFFICIAL, "dit.safetensors", "fantasytalking.ckpt")


@pytest.fixture(scope="module")
def ray_instance():
    """For tests that start Ray worker pools: a local Ray instance with 8 logical CPUs (Ray gives each CPU worker
    one, and a module's shared pool holds two while other tests start pools of their own), stopped after the
    module, so that its processes do not stay for the rest of the suite."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False)  # never a cluster RAY_ADDRESS names
    yield
    ray.shutdown()
