"""The training loop's batch feeding: prefetch across epoch boundaries."""
import threading
import time

import pytest

from dmdscale.core.loop import prefetched


def _epochs(n_epochs: int, per_epoch: int):
    for e in range(n_epochs):
        yield from (e * per_epoch + i for i in range(per_epoch))


def test_prefetched_yields_everything_in_order():
    assert list(prefetched(_epochs(3, 4), depth=2)) == list(range(12))
    assert list(prefetched(_epochs(2, 3), depth=0)) == list(range(6))


def test_prefetched_reads_into_the_next_epoch_before_the_consumer_asks():
    produced = []

    def source():
        for item in _epochs(2, 3):
            produced.append(item)
            yield item

    it = prefetched(source(), depth=8)
    assert next(it) == 0
    deadline = time.time() + 10
    while len(produced) < 6 and time.time() < deadline:
        time.sleep(0.01)
    # With one item consumed, the thread has already crossed the epoch boundary.
    assert produced == list(range(6))
    assert list(it) == list(range(1, 6))


def test_prefetched_reraises_source_errors_in_the_consumer():
    def broken():
        yield 1
        raise OSError("shard lost")

    it = prefetched(broken(), depth=4)
    assert next(it) == 1
    with pytest.raises(OSError, match="shard lost"):
        next(it)


def test_closing_stops_the_thread():
    def endless():
        while True:
            yield 0

    before = threading.active_count()
    it = prefetched(endless(), depth=2)
    next(it)
    it.close()
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
