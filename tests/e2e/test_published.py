"""What a run writes out holds no secret, and what it publishes (the exported student) no local
path either (issue 37): one quick digits run through the real command, with a credential in a
config value that is written out and used (the checkpoint storage URI), every file of the run
folder and of the student folder searched for it afterwards."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "digits.py"
SECRET = "SECRETzq81x"  # a value no file would hold by chance


def _holding(folder: Path, needle: str) -> list[str]:
    """The files under `folder` (binary ones too) whose bytes contain `needle`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and needle.encode() in p.read_bytes())


@pytest.mark.slow
def test_the_run_folder_holds_no_secret_and_the_student_no_local_path(tmp_path, mlflow_uri, digits_cache):
    out = tmp_path / "run"
    storage = f"file://{tmp_path / 'checkpoints'}?secret_key={SECRET}"  # pyarrow: the local folder, a query
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(out), f"cache_dir={digits_cache}",
                           f"scale.storage_path={storage}", "eval.during_training=false", "eval.num_samples=20",
                           "train.max_steps=2"], capture_output=True, text=True, timeout=1500, cwd=tmp_path,
                          env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints").is_dir()  # the URI was used, query and all
    student = out / "student"
    card = (student / "README.md").read_text()

    # No file of the run folder (the student included) and nothing the command printed holds the secret.
    assert _holding(out, SECRET) == []
    assert SECRET not in proc.stdout + proc.stderr
    assert "secret_key=***" in card  # the card still says what was configured, masked
    params = mlflow.search_runs(experiment_names=["digits"], output_format="list")[0].data.params
    assert params["scale.storage_path"].endswith("?secret_key=***")

    # The student folder names nothing of this machine: no absolute path, no home directory, no account.
    for needle in {str(tmp_path), str(digits_cache), str(Path.home())}:
        assert _holding(student, needle) == [], needle
    teachers = {p.name for p in (Path(digits_cache) / "teachers").iterdir()}  # trained here: its folder's own name
    assert any(f"DMD2 student of `{name}`" in card for name in teachers), card[:600]
    assert 'from_pretrained("student", subfolder="unet")' in card
