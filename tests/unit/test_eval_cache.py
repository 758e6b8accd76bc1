"""The evaluation cache: the teacher's samples are drawn once per key and read back after."""
import numpy as np

from dmdscale.eval.cache import cached_arrays, folder_fingerprint


def test_a_key_is_drawn_once_and_a_changed_key_draws_again(tmp_path):
    calls = []

    def make(value):
        def draw():
            calls.append(value)
            return {"teacher": np.full((3, 2, 2, 1), value, np.uint8), "teacher_1step": np.zeros(2, np.uint8)}
        return draw

    key = {"teacher": "abc", "teacher_steps": 50, "labels": np.arange(3), "seed": 7}
    first, cached = cached_arrays(tmp_path, key, make(1))
    assert not cached and calls == [1]
    again, cached = cached_arrays(tmp_path, dict(key), make(2))
    assert cached and calls == [1] and np.array_equal(again["teacher"], first["teacher"])
    for change in ({"teacher_steps": 20}, {"teacher": "abd"}, {"labels": np.arange(3) + 1}, {"seed": 8}):
        _, cached = cached_arrays(tmp_path, key | change, make(3))
        assert not cached
    assert calls == [1, 3, 3, 3, 3]
    _, cached = cached_arrays(None, key, make(4))  # no folder: nothing kept
    assert not cached and calls[-1] == 4


def test_a_damaged_file_is_drawn_again(tmp_path):
    key = {"teacher": "abc"}
    cached_arrays(tmp_path, key, lambda: {"a": np.ones(4)})
    (stored,) = tmp_path.glob("*.npz")
    stored.write_bytes(stored.read_bytes()[:20])
    arrays, cached = cached_arrays(tmp_path, key, lambda: {"a": np.zeros(4)})
    assert not cached and not arrays["a"].any()


def test_the_teachers_identity_is_its_bytes_not_its_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "w.bin").write_bytes(b"weights")
    assert folder_fingerprint(tmp_path / "a") == folder_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "unet" / "w.bin").write_bytes(b"weightz")
    assert folder_fingerprint(tmp_path / "a") != folder_fingerprint(tmp_path / "b")
