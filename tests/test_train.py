"""Resource planning for the Ray Train workers (pure logic, no cluster)."""
import os

import pytest

from dmdscale.config import build_config
from dmdscale.train import _cpu_threads, node_cores, plan_resources


def test_two_cpus_leave_one_for_ray_data():
    cfg = build_config({"scale": {"num_workers": 1, "data_cpus": 1.0}})
    assert plan_resources(cfg, 2.0) == {"CPU": 1.0}
    two = build_config({"scale": {"num_workers": 2, "data_cpus": 1.0}})
    assert plan_resources(two, 2.0) == {"CPU": 0.5}


def test_plan_that_starves_ray_data_is_refused_naming_the_keys():
    cfg = build_config({"scale": {"num_workers": 2, "data_cpus": 2.0}})
    with pytest.raises(ValueError, match="scale.num_workers=2 with scale.data_cpus=2"):
        plan_resources(cfg, 2.0)


def test_gpu_workers_take_one_gpu_each():
    assert plan_resources(build_config({"scale": {"use_gpu": True}}), 8.0) == {"CPU": 1.0, "GPU": 1.0}


def test_cpu_threads_split_the_node_or_follow_the_config():
    cfg = build_config({})
    assert 1 <= node_cores() <= os.cpu_count()
    assert _cpu_threads(cfg.scale, 1) == node_cores()
    assert _cpu_threads(cfg.scale, node_cores() * 2) == 1
    assert _cpu_threads(build_config({"scale": {"cpu_threads_per_worker": 3}}).scale, 1) == 3
