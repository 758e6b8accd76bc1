"""Issue 37's probe commands for configs and the command line, rerun through the real
scripts: each is one line naming the key, exit 2, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# -- the probe's commands, rerun: one line, before any work -----------------------------------------
@pytest.mark.slow
def test_the_probe_commands_are_one_line_before_any_work(tmp_path):
    cases = [
        (["pipelines/digits.py", "--quick", "train.betas=[1.5,0.999]"], "train.betas"),
        (["pipelines/digits.py", "--quick", "regression.enabled=true"], "regression.enabled"),
        (["pipelines/sweep.py", "--quick", "sweep.metric=fid_studnet"], "did you mean fid_student"),
        (["pipelines/digits.py", "--quick", "--out", str(tmp_path / "file")], "is a file, not a folder"),
    ]
    (tmp_path / "file").write_text("")
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:], f"cache_dir={tmp_path / 'cache'}",
                               *(["--out", str(tmp_path / "o")] if "--out" not in args else [])],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o" / "ray").exists()
