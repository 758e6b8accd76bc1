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


@pytest.fixture(scope="module")
def captioned_parquet(tmp_path_factory):
    """A small image + caption Parquet (96 digits, "a handwritten digit N"): text-to-image runs
    on it encode in seconds, where the whole digits split would take most of a minute."""
    import pyarrow.parquet as pq

    from dmdscale.data import build_digits_parquet

    root = tmp_path_factory.mktemp("captioned")
    table = pq.read_table(build_digits_parquet(root / "digits")["train"]).slice(0, 96)
    pq.write_table(table, root / "captioned.parquet")
    return str(root / "captioned.parquet")
