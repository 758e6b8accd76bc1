"""Resource planning for the Ray Train workers (pure logic, no cluster)."""
import os

import pytest

from dmdscale.config import build_config
from dmdscale.distributed.resources import cpu_threads, node_cores, worker_resources
from dmdscale.families import resolve


def test_two_cpus_leave_one_for_ray_data():
    no_eval = {"during_training": False}
    cfg = build_config({"scale": {"num_workers": 1, "data_cpus": 1.0}, "eval": no_eval})
    assert worker_resources(cfg, resolve(cfg), 2.0) == {"CPU": 1.0}
    two = build_config({"scale": {"num_workers": 2, "data_cpus": 1.0}, "eval": no_eval})
    assert worker_resources(two, resolve(two), 2.0) == {"CPU": 0.5}


def test_rollout_and_evaluation_actors_get_their_cpus_before_the_workers():
    four = [999, 749, 499, 249]
    cfg = build_config({"model": {"family": "unet2d"}, "scale": {"num_workers": 1, "data_cpus": 1.0},
                        "generator": {"timesteps": four},
                        "rollout": {"mode": "actors", "num_actors": 1, "actor_cpus": 0.25},
                        "eval": {"num_actors": 1, "actor_cpus": 0.25}})
    assert worker_resources(cfg, resolve(cfg), 2.0) == {"CPU": 0.5}  # 2 - 1 data - 0.25 rollout - 0.25 eval
    # A one-step student never simulates, so its rollout actors are not started or planned.
    one = build_config({"model": {"family": "unet2d"}, "scale": {"data_cpus": 1.0},
                        "rollout": {"mode": "actors", "actor_cpus": 0.25},
                        "eval": {"actor_cpus": 0.25}})
    assert worker_resources(one, resolve(one), 2.0) == {"CPU": 0.75}
    with pytest.raises(ValueError, match="rollout/evaluation actors"):
        worker_resources(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_actors": 4})}), resolve(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_actors": 4})})), 2.0)


def test_gpu_rollout_actors_share_their_workers_gpu():
    cfg = build_config({"model": {"family": "unet2d"}, "scale": {"use_gpu": True, "num_workers": 2},
                        "generator": {"timesteps": [999, 499]},
                        "rollout": {"mode": "actors", "num_actors": 1, "actor_gpus": 0.25},
                        "eval": {"num_actors": 1, "actor_gpus": 0.5}})
    assert worker_resources(cfg, resolve(cfg), 8.0) == {"CPU": 1.0, "GPU": 0.5}  # 1 - 0.25 rollout - 0.5/2 eval


def test_plan_that_starves_ray_data_is_refused_naming_the_keys():
    cfg = build_config({"scale": {"num_workers": 2, "data_cpus": 2.0}, "eval": {"during_training": False}})
    with pytest.raises(ValueError, match="scale.num_workers=2 with scale.data_cpus=2"):
        worker_resources(cfg, resolve(cfg), 2.0)


def test_gpu_workers_take_one_gpu_each():
    cfg = build_config({"scale": {"use_gpu": True}, "eval": {"during_training": False}})
    assert worker_resources(cfg, resolve(cfg), 8.0) == {"CPU": 1.0, "GPU": 1.0}


def test_cpu_threads_split_the_node_or_follow_the_config():
    cfg = build_config({})
    assert 1 <= node_cores() <= os.cpu_count()
    assert cpu_threads(cfg, 1) == node_cores()
    assert cpu_threads(cfg, node_cores() * 2) == 1
    assert cpu_threads(build_config({"scale": {"cpu_threads_per_worker": 3}}), 1) == 3
    # Rollout actors' cores are left to them (a 4-step student with one 1-CPU actor).
    rollouts = build_config({"generator": {"timesteps": [999, 749, 499, 249]},
                             "rollout": {"mode": "actors", "num_actors": 1, "actor_cpus": 1.0}})
    assert cpu_threads(rollouts, 1) == max(1, node_cores() - 1)


def test_evaluation_actors_are_planned_only_for_the_class_conditional_family():
    # Text families and the toy are evaluated on the driver, so no CPU is held back for an eval pool.
    for family, planned in (("unet2d", 0.75), ("toy2d", 1.0)):
        cfg = build_config({"model": {"family": family}, "scale": {"data_cpus": 1.0},
                            "eval": {"num_actors": 1, "actor_cpus": 0.25}})
        assert worker_resources(cfg, resolve(cfg), 2.0) == {"CPU": planned}
