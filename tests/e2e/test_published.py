"""What a run writes out holds no secret, and what it publishes (the exported student) no local
path either (issue 37): one quick digits run through the real command (conftest's `levers_run`),
with a credential in a config value that is written out and used (the checkpoint storage URI),
every file of the run folder and of the student folder searched for it afterwards."""
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import RUN_SECRET as SECRET


def _holding(folder: Path, needle: str) -> list[str]:
    """The files under `folder` (binary ones too) whose bytes contain `needle`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and needle.encode() in p.read_bytes())


@pytest.mark.slow
def test_the_run_folder_holds_no_secret_and_the_student_no_local_path(levers_run, digits_cache):
    root, out, proc, uri = levers_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "checkpoints").is_dir()  # the URI was used, query and all
    student = out / "student"
    card = (student / "README.md").read_text()

    # No file of the run folder (the student included) and nothing the command printed holds the secret.
    assert _holding(out, SECRET) == []
    assert SECRET not in proc.stdout + proc.stderr
    assert "secret_key=***" in card  # the card still says what was configured, masked
    client = MlflowClient(uri)
    params = client.search_runs([client.get_experiment_by_name("digits").experiment_id])[0].data.params
    assert params["scale.storage_path"].endswith("?secret_key=***")

    # The student folder names nothing of this machine: no absolute path, no home directory, no account.
    for needle in {str(root), str(digits_cache), str(Path.home())}:
        assert _holding(student, needle) == [], needle
    teachers = {p.name for p in (Path(digits_cache) / "teachers").iterdir()}  # trained here: its folder's own name
    assert any(f"DMD2 student of `{name}`" in card for name in teachers), card[:600]
    assert 'from_pretrained("student", subfolder="unet")' in card
