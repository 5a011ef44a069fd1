"""A Ray worker pool over a Ray cluster of two machines: two Ray nodes (each its own raylet and object store, as
two hosts have), both on this host, joined as ComfyUI joins a cluster (RAY_ADDRESS). Kept in its own module: it
needs its own Ray connection, not the local instance the other pool tests share."""

from __future__ import annotations

import pytest
import torch
from parallel_cases import load_model, ray_node_ids, sample, sample_in_pool

from fantasytalking_core.errors import SettingsError
from fantasytalking_core.runtime.parallel import ParallelLayout
from fantasytalking_core.runtime.pool import SamplerPool


@pytest.fixture(scope="module")
def two_machines():
    """A Ray cluster of two nodes with one CPU each (so one CPU worker fits on each), the driver connected to it;
    everything stopped afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a local instance another module left
    small = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    cluster.add_node(**small)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_ray_pool_spreads_its_workers_over_the_machines_and_samples_as_one_process(two_machines):
    """cfg=2 CPU workers, one CPU each: Ray puts one on each machine; their process group spans both and the
    clip equals one process's."""
    with SamplerPool(ParallelLayout(cfg=2), load_model, "cpu", timeout_s=300, backend="ray") as pool:
        nodes = pool.call(ray_node_ids)
        latent = pool.call(sample_in_pool)
    assert len(set(nodes)) == 2 and set(nodes) == {node.node_id for node in two_machines.list_all_nodes()}
    torch.testing.assert_close(latent, sample(load_model()), rtol=0, atol=1e-5)


def test_a_layout_larger_than_the_cluster_is_refused_before_any_actor_starts(two_machines):
    with pytest.raises(SettingsError, match=r"needs 3 CPUs \(one per worker\); 2 are available"):
        SamplerPool(ParallelLayout(cfg=3), load_model, "cpu", backend="ray")
