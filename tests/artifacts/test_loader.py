"""stages.artifacts.loader.SlotLoader: batches written by worker processes into shared buffers, in task order."""
import os
import time

import numpy as np
import pytest
import torch

from stages.errors import RaeError
from stages.artifacts.loader import SlotLoader


def _fill(task, out):
    """Task (k, n, delay): n bytes of value k % 251, after a delay (so workers finish out of order)."""
    k, n, delay = task
    time.sleep(delay)
    out[:n] = k % 251
    out[n: n + 8] = 255  # beyond what it reports: must not be copied
    return {"k": k, "n": n, "pid": os.getpid()}, n


def _fill_failing(task, out):
    if task == 3:
        raise ValueError("task three is broken")
    out[:1] = task
    return task, 1


def _fill_dying(task, out):
    # Task 0 is the first a worker takes, so the dying worker has sent nothing yet: dying in the middle of
    # a send would leave the result queue's lock held, and the other worker unable to finish (close()
    # then waits 5 s for it before terminating it).
    if task == 0:
        os._exit(7)  # a crash in native code, as far as the main process can tell
    return task, 0


def _collect(loader):
    got = []
    for data, meta in loader:
        got.append((meta["k"], len(data), bool((data == meta["k"] % 251).all()), meta["pid"]))
    return got


@pytest.mark.parametrize("workers,slots", [(0, None), (3, None), (2, 2), (4, 1)])
def test_results_come_in_task_order_with_the_buffer_contents(workers, slots):
    rng = np.random.default_rng(workers)
    tasks = [(k, int(rng.integers(1, 4000)), float(rng.uniform(0, 0.02))) for k in range(40)]
    got = _collect(SlotLoader(_fill, tasks, workers, 4096, slots=slots))
    assert [g[0] for g in got] == list(range(40))
    assert all(g[2] for g in got), "a buffer was refilled before its consumer was done with it"
    assert [g[1] for g in got] == [t[1] for t in tasks]
    pids = {g[3] for g in got}
    assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)


def test_a_failing_fill_is_reraised_with_the_workers_traceback():
    loader = SlotLoader(_fill_failing, list(range(8)), 2, 16)
    with pytest.raises(RuntimeError, match="task three is broken"):
        for _ in loader:
            pass
    loader.close()


def test_a_dead_worker_ends_the_run_with_one_line():
    loader = SlotLoader(_fill_dying, list(range(6)), 2, 16).start()
    # The loader looks for dead workers whenever no result has come for a while (5 s); 0.2 s here.
    get = loader.result_q.get
    loader.result_q.get = lambda block=True, timeout=None: get(block, None if timeout is None else min(timeout, 0.2))
    with pytest.raises(RaeError) as e:
        for _ in loader:
            pass
    assert "stopped unexpectedly" in str(e.value) and "\n" not in str(e.value)
    loader.close()


def test_close_stops_the_workers_early():
    loader = SlotLoader(_fill, [(k, 8, 0.0) for k in range(100)], 3, 16).start()
    procs = list(loader.workers)
    next(loader)
    loader.close()
    assert procs and not any(p.is_alive() for p in procs)
    with pytest.raises(StopIteration):
        next(loader)


def test_items_stay_valid_after_their_buffer_is_refilled():
    loader = SlotLoader(_fill, [(k, 64, 0.0) for k in range(12)], 2, 80, slots=2)
    out = [data for data, _ in loader]  # kept across iterations: each item owns its bytes
    assert [int(t[0]) for t in out] == list(range(12)) and all(bool((t == t[0]).all()) for t in out)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and len(t) == 64 for t in out)


def test_no_room_for_shared_buffers_is_one_line(monkeypatch):
    def refuse(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", refuse)
    with pytest.raises(RaeError) as e:
        SlotLoader(_fill, [(k, 8, 0.0) for k in range(4)], 2, 16).start()
    assert "--shm-size" in str(e.value) and "\n" not in str(e.value)
