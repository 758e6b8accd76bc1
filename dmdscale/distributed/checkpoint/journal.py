"""The driver's run journal: the run's config, its starts and markers, on the run's storage;
what decides whether a run starts anew, resumes, or only reruns its final evaluation."""
from __future__ import annotations

import json
import uuid
from pathlib import PurePosixPath
from typing import Any

from dmdscale.config import ConfigError
from dmdscale.distributed.checkpoint.integrity import (
    _checkpoint_folders,
    _LocalCheckpoint,
    checkpoint_folders,
    load_latest_good,
    verify_checkpoint,
)
from dmdscale.distributed.checkpoint.state import CONFIG_FILE


# Keys that may change when a run resumes; any other change means a different run.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_failures", "eval.", "scale.prefetch_batches",
                     "scale.cpu_threads_per_worker", "scale.storage_path", "scale.cluster_cpus", "rollout.",
                     "data.encode_", "scale.resource_wait_s")
# Keys that may change when a trained run only reruns its final evaluation: the resumable ones
# but the length of training (the trained student has the recorded one).
EVALUATION_CHANGES = tuple(k for k in RESUMABLE_CHANGES if k != "train.max_steps")


class RunJournal:
    """A small JSON file next to the run's checkpoints, on the run's storage (local or remote,
    through pyarrow's filesystem): the run's config, one record per time training started, and
    markers such as "this failure was already injected", which must outlive the worker that
    wrote them."""

    def __init__(self, filesystem: Any, directory: str, name: str = "dmdscale_journal.json"):
        self.fs, self.directory = filesystem, directory.rstrip("/")
        self.path = f"{self.directory}/{name}"

    @classmethod
    def at(cls, storage_path: str, run_name: str) -> "RunJournal":
        """The journal of run `run_name` under a storage path or URI (e.g. s3://bucket/runs)."""
        import pyarrow.fs

        from dmdscale.redact import redact

        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        except (OSError, pyarrow.ArrowException) as exc:  # a bad URI, an unreachable bucket, no credentials
            raise ConfigError(redact(f"scale.storage_path: cannot use {storage_path} for checkpoints "
                                     f"({str(exc).splitlines()[0]}); fix the URI, the network or the credentials, "
                                     f"or leave it unset to keep them in <out>/ray")) from None
        return cls(fs, f"{root.rstrip('/')}/{run_name}")

    def read(self) -> dict[str, Any]:
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return {"starts": [], "markers": []}
        with self.fs.open_input_stream(self.path) as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode())
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise self._damaged(exc) from None
        if not isinstance(data, dict) or not isinstance(data.get("starts"), list):
            raise self._damaged("not a journal record")
        return data

    def _damaged(self, reason: Any) -> ConfigError:
        # Deleting only the journal is safe: begin() rebuilds it from the config the checkpoints
        # record, and refuses to resume them under another one.
        return ConfigError(f"run journal {self.path} is damaged ({reason}); move it aside (or delete that "
                           f"file only) and rerun the same command: the journal is rebuilt from the config "
                           f"its checkpoints record and the run resumes, checkpoints kept; or use another --out "
                           f"(or scale.storage_path) to start afresh")

    def begin(self, config: dict[str, Any]) -> str:
        """Called by the driver before training; returns what to do with the run folder:

        - "new": train from scratch (a finished run's folder is cleared first; an unfinished
          run of another config that never wrote a checkpoint is replaced, with a note);
        - "resume": resume the unfinished training of the same config;
        - "evaluate": training finished (`mark_trained`) but the final evaluation did not; run
          only the evaluation (evaluation keys may have changed).

        An unfinished run with a checkpoint and another config is an error naming the keys, so
        nothing of it is lost by accident. Without the journal (deleted, moved aside) but with
        checkpoints, the journal is rebuilt from the config the newest of them records
        (`_rebuilt`), and the same rules apply.
        """
        config = json.loads(json.dumps(config, default=str))  # as it reads back (tuples -> lists)
        data = self.read()
        if "config" not in data and not data.get("finished"):
            data = self._rebuilt() or data  # no journal beside checkpoints: theirs is the run's config
        if data.get("finished"):
            self.fs.delete_dir_contents(self.directory)
            data = {"starts": [], "markers": []}
        elif "config" in data:
            may_change = EVALUATION_CHANGES if data.get("trained") else RESUMABLE_CHANGES
            changed = sorted(k for k in set(config) | set(data["config"])
                             if not k.startswith(may_change) and config.get(k) != data["config"].get(k))
            if not changed:
                return "evaluate" if data.get("trained") else "resume" if data["starts"] else "new"
            self._refuse_replacing(changed, data)
            print(f"dmdscale: {self.directory} holds a run of another config ({', '.join(changed)}) that "
                  f"wrote no checkpoint; starting this one in its place")
            data = {"starts": [], "markers": []}
        data["config"] = config
        self._write(data)
        return "new"

    def _rebuilt(self) -> dict[str, Any] | None:
        """The journal rebuilt (and written) from the newest checkpoint's CONFIG_FILE when the
        journal is missing (deleted, moved aside) but checkpoints are there; None without
        checkpoints. Checkpoints that do not record a config (an older dmdscale) are refused:
        resuming them under an unknown config could mix two runs."""
        import pyarrow.fs

        folders = checkpoint_folders(self.fs, self.directory)
        if not folders:
            return None
        for folder in folders:  # newest first; a final checkpoint records it too
            recorded = self._read_json(f"{folder}/{CONFIG_FILE}")
            if isinstance(recorded, dict):
                break
        else:
            raise ConfigError(
                f"{self.directory} holds checkpoints but no run journal ({PurePosixPath(self.path).name}), and "
                f"they do not record the config they were written under (an older dmdscale wrote them); use "
                f"another --out (or scale.storage_path), or delete {self.directory} to train afresh")
        trained = self.fs.get_file_info(f"{folder}/train_metrics.json").type == pyarrow.fs.FileType.File
        print(f"dmdscale: {self.directory} has no run journal; rebuilt it from {PurePosixPath(folder).name}, "
              f"which records the config its run was written under")
        data = {"config": recorded, "starts": [0], "markers": [], "rebuilt_from": PurePosixPath(folder).name,
                **({"trained": True} if trained else {})}
        self._write(data)
        return data

    def _read_json(self, path: str) -> Any:
        """A small JSON file on the storage, or None when it is missing or unreadable."""
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):  # missing (FileNotFoundError), unreadable, not JSON
            return None

    def resume_point(self) -> str | None:
        """Driver side, before any cluster work: the newest checkpoint a resume will start from,
        verified when the storage is local (remote ones are verified by the workers, which fall
        back the same way). A CorruptCheckpoint naming each bad file when none is good, so the
        run stops here, with nothing of it deleted."""
        import pyarrow.fs

        folders = checkpoint_folders(self.fs, self.directory)
        if not folders:
            return None
        if not isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            return folders[0]
        return load_latest_good((_LocalCheckpoint(f) for f in folders), lambda d: (verify_checkpoint(d), str(d))[1],
                                warn=lambda message: None)  # the workers warn when they fall back

    def _refuse_replacing(self, changed: list[str], data: dict[str, Any]) -> None:
        """An error if the run of another config has anything to lose: a checkpoint (its
        progress) or its training (trained, final evaluation pending)."""
        keys = ", ".join(changed)
        # Its values, so that "the same config" can be given even when the journal was lost.
        recorded = ", ".join(f"{k}={json.dumps(data['config'].get(k))}" for k in changed[:6])
        recorded += ", ..." if len(changed) > 6 else ""
        if data.get("trained"):
            raise ConfigError(
                f"{self.directory} holds a trained run whose final evaluation did not finish, with a "
                f"different config ({keys}); rerun with its config ({recorded}) to evaluate it (evaluation "
                f"keys such as eval.* may change), or use another --out (or scale.storage_path)")
        if _checkpoint_folders(self.fs, self.directory):
            raise ConfigError(
                f"{self.directory} holds an unfinished run with a different config "
                f"({keys}); resume it with the same config ({recorded}), or use another --out "
                f"(or scale.storage_path)")

    def note(self, key: str, value: Any) -> None:
        data = self.read()
        data[key] = value
        self._write(data)

    def mark_trained(self) -> None:
        """Training is done and its student saved; a rerun only evaluates (begin -> "evaluate")."""
        self.note("trained", True)

    def mark_finished(self) -> None:
        self.note("finished", True)

    def _write(self, data: dict[str, Any]) -> None:
        """Write a temp file beside the journal, then rename it over the journal: a crash
        mid-write leaves the old journal whole (an object store's PUT appears whole anyway)."""
        self.fs.create_dir(self.directory, recursive=True)
        temp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(temp) as f:
                f.write(json.dumps(data, indent=1).encode())
            self.fs.move(temp, self.path)
        except BaseException:
            self._delete_quietly(temp)
            raise

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # never written, or already moved
            pass

    def record_start(self, step: int) -> int:
        """Note that training (re)started at `step`; returns how many starts came before."""
        data = self.read()
        data["starts"].append(step)
        self._write(data)
        return len(data["starts"]) - 1

    def mark_once(self, marker: str) -> bool:
        """True the first time a marker is set for this run, False afterwards."""
        data = self.read()
        if marker in data["markers"]:
            return False
        data["markers"].append(marker)
        self._write(data)
        return True
