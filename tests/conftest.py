import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when Ray or a second process runs too.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store per test, through the documented environment variable."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on this machine's 2 CPUs, shared by one test module."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
