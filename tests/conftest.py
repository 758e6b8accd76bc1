import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One cache_dir (digits Parquet, FID classifier, quick teacher) for every quick digits run
    of the session, as a user's runs share ~/.cache/dmdscale."""
    return tmp_path_factory.mktemp("digits-cache")


# The issue-34 variety levers, each on, for the one quick run that shows they reach Ray Train.
VARIETY_LEVERS = ["generator.timesteps=[999,249]", "generator.step_draw=row", "loss.step_noise_bands=true",
                  "loss.step_conditioned_critic=true", "loss.divergence=jensen_shannon",
                  "loss.gan_gate_accuracy=0.6", "loss.gan_weight_cap=0.5", "loss.fake_score_timesteps=dm",
                  "loss.regression_weight=0.01", "loss.regression_lowpass=2", "loss.regression_anneal_steps=8",
                  "loss.regression_pairs=32", "loss.regression_sampler_steps=4"]
RUN_SECRET = "SECRETzq81x"  # a value no file would hold by chance


@pytest.fixture(scope="session")
def levers_run(tmp_path_factory, digits_cache):
    """One short quick digits run through the real command that tests only read (a quick run's
    start-up is most of its minute, so they share it): every variety lever on, and a credential
    in a config value that is written out and used (the checkpoint storage URI, a pyarrow local
    folder with a query). (root, run folder, the command's CompletedProcess, MLflow URI)."""
    root = tmp_path_factory.mktemp("levers-run")
    out, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    storage = f"file://{root / 'checkpoints'}?secret_key={RUN_SECRET}"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "pipelines" / "digits.py"), "--quick",
                           "--out", str(out), f"cache_dir={digits_cache}", f"scale.storage_path={storage}",
                           "train.max_steps=10", "train.log_every=1", "eval.during_training=false",
                           "eval.num_samples=20", *VARIETY_LEVERS], capture_output=True, text=True, timeout=1500,
                          cwd=root, env=os.environ | {"MLFLOW_TRACKING_URI": uri})
    return root, out, proc, uri


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on this machine's 2 CPUs, shared by one test module. Without the
    dashboard: no test reads it, and its processes start in ~2 s and take CPU from the tests."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random-weight sd15 and sdxl pipeline folders (dmdscale.families.sd.tiny), by family."""
    from dmdscale.families.sd.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {f: str(build_tiny_pipeline(f, root / f)) for f in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def tiny_flow(tmp_path_factory):
    """Tiny random-weight sd3 and flux pipeline folders (dmdscale.families.flow.tiny), by family."""
    from dmdscale.families.flow.tiny import build_tiny_flow_pipeline

    root = tmp_path_factory.mktemp("tiny_flow")
    return {f: str(build_tiny_flow_pipeline(f, root / f)) for f in ("sd3", "flux")}


def text_cfg(family: str, teacher: str, **overrides):
    """A text-to-image family's config on a tiny teacher (RGB data)."""
    from dmdscale.config import build_config

    return build_config({}, {"model.family": family, "model.teacher": teacher, "data.channels": 3,
                             "data.resolution": 32, "train.warmup_steps": 0, **overrides})


@pytest.fixture(scope="module")
def captioned_parquet(tmp_path_factory):
    """A small image + caption Parquet (96 digits, "a handwritten digit N"): text-to-image runs
    on it encode in seconds, where the whole digits split would take most of a minute."""
    import pyarrow.parquet as pq

    from dmdscale.data.sources import build_digits_parquet

    root = tmp_path_factory.mktemp("captioned")
    table = pq.read_table(build_digits_parquet(root / "digits")["train"]).slice(0, 96)
    pq.write_table(table, root / "captioned.parquet")
    return str(root / "captioned.parquet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """`mlflow server` on 127.0.0.1 in its own process group (it forks uvicorn workers)."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_up(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not answers(f"{self.uri}/health"):
            assert self.proc.poll() is None, (Path(self.log.name).read_text())[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL to the whole group: the server is gone at once, as a crashed one is."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # killed already
            pass
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free 127.0.0.1 port."""
    srv = Server(tmp_path / "server")
    try:
        srv.wait_until_up()
        yield srv
    finally:
        srv.kill()


def exported_text_student(tiny: dict, root: Path, prompts: list[str]) -> dict:
    """An exported 1-step SD1.5 student (the tiny teacher's own UNet) in `root`, a tiny CLIP and
    a prompt file: what the evaluate command's tests measure."""
    from diffusers import UNet2DConditionModel

    from dmdscale.families.sd.export import export_pipeline
    from dmdscale.families.sd.tiny import build_tiny_clip

    unet = UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet")
    student = export_pipeline(tiny["sd15"], "sd15", unet, [999], root / "student")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {"root": root, "student": student, "clip": str(build_tiny_clip(root / "clip")),
            "prompts": root / "prompts.txt", "unet": unet}
