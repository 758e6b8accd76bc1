"""A real client: `ray job submit -- python pipelines/sdxl.py` to a head started with `ray start`.

The head runs on loopback with its own ports and token authentication on (Ray's default for
`ray start --head`): the same secret is exported as RAY_AUTH_TOKEN with RAY_AUTH_MODE=token to
the head and to the client, and a client without it is refused.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdscale.families.sd.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def head():
    """`ray start --head --block` in its own session, stopped by signalling that session (a
    plain `ray stop` would stop every Ray on the machine)."""
    token = secrets.token_hex(16)
    gcs, dashboard, client, manager, objects, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
           f"--node-manager-port={manager}", f"--object-manager-port={objects}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"ray start exited: {proc.stdout.read()}"
            ready = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if ready.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up in 180 s")
        yield {"address": address, "env": env, "token": token}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # `ray start --block` can take half a minute to wind down
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)  # any worker that left the session


def test_ray_job_submit_runs_the_sdxl_lora_pipeline(head, captioned_parquet, tmp_path):
    teacher = build_tiny_pipeline("sdxl", tmp_path / "tiny-sdxl")
    out = tmp_path / "run"
    env, address = head["env"], head["address"]

    # Token authentication is on: a client without the token is refused.
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous,
                             capture_output=True, text=True)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "auth" in (refused.stdout + refused.stderr).lower()

    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    job_id = f"dmdscale-test-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "pipelines/sdxl.py", "--quick", f"--out={out}", f"model.teacher={teacher}",
         f"cache_dir={tmp_path / 'cache'}", f"data.path={captioned_parquet}", "train.max_steps=4",
         "lora.enabled=true", "lora.rank=4", "scale.zero_stage=3"],  # the LoRA variant, under ZeRO-3
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    deadline, status = time.time() + 900, ""
    while time.time() < deadline:  # `ray job status` ends with e.g. "Job 'x' succeeded" (on stderr)
        done = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                              capture_output=True, text=True)
        status = (done.stdout + done.stderr).lower()
        if any(f"job '{job_id}' {s}" in status for s in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(5)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    assert f"job '{job_id}' succeeded" in status, f"{status}\n{logs[-6000:]}"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_completed"] == 4
    assert metrics["student_steps"] == 4
    samples = np.load(out / "samples.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape[1:] == (32, 32, 3)
    assert (out / "samples.png").stat().st_size > 0
    model_index = json.loads((out / "student" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"

    # The exported student samples in its 4 steps with stock diffusers' ordinary call, and the
    # LoRA weights in both layouts (peft, kohya) loaded into the teacher pipeline give the same
    # latents when sampled with the student's scheduler, timesteps and no guidance.
    from diffusers import DiffusionPipeline, LCMScheduler
    from test_text2img import generate_latents

    student = DiffusionPipeline.from_pretrained(str(out / "student"))
    pipe = DiffusionPipeline.from_pretrained(str(teacher))
    teacher_before = generate_latents(pipe, num_inference_steps=4, guidance_scale=1.0)
    pipe.load_lora_weights(str(out / "student" / "lora"))
    pipe.scheduler = LCMScheduler.from_pretrained(str(out / "student"), subfolder="scheduler")
    with_lora = generate_latents(pipe, timesteps=[999, 749, 499, 249], guidance_scale=0.0)
    exported = generate_latents(student, num_inference_steps=4)
    torch.testing.assert_close(with_lora, exported, rtol=1e-3, atol=1e-4)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out / "student" / "lora_kohya"))
    with_kohya = generate_latents(pipe, timesteps=[999, 749, 499, 249], guidance_scale=0.0)
    torch.testing.assert_close(with_kohya, exported, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(teacher_before, exported)  # the student is not the teacher
