"""Worker processes that write batches straight into shared, page-locked buffers.

torch's DataLoader hands every batch over in a new shared-memory segment, which the main process
(with ``pin_memory``) copies once more into page-locked memory before the GPU can take it. For
``rae encode``, at thousands of images per second, that copy and the page faults of ever-new segments
were the limit (BENCHMARKS.md: 1,425 img/s through the DataLoader where the same workers decode 6,871).
Here the main process allocates a fixed ring of shared buffers once, page-locks them for the GPU
(``cudaHostRegister``), and the workers fill them in place; the GPU copies straight out of them.

The contract: ``fill(task, out)`` runs in a worker, writes its data into the uint8 numpy array ``out``
and returns ``(description, nbytes)``: a small picklable description and how many bytes of ``out``
it wrote. The loader yields ``(data, description)`` in task order, ``data`` being those bytes as a
uint8 tensor on the loader's device: copied there on a side stream (the current stream waits for the
copy, nothing else does), and the buffer refilled as soon as the copy has landed, however far behind
the GPU's other work is. On the CPU ``data`` is a copy of the buffer's bytes.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import queue
import signal
import traceback
from typing import Any, Callable, Sequence

import torch

from ..errors import RaeError

Fill = Callable[[Any, "Any"], Any]


def _worker(fill: Fill, buffers: list[torch.Tensor], tasks, results, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    try:  # when cores are short, the main process (which feeds the GPU) goes first
        os.nice(5)
    except OSError:
        pass
    views = [b.numpy() for b in buffers]
    while True:
        try:
            item = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone: stop, do not linger
                return
            continue
        if item is None:
            return
        seq, slot, task = item
        try:
            results.put((seq, slot, fill(task, views[slot]), None))
        except Exception:  # a bug, not a bad image (fill handles those): report it whole
            results.put((seq, slot, None, traceback.format_exc()))


def _register(buffers: list[torch.Tensor], device: torch.device) -> bool:
    """Page-lock the shared buffers for the GPU's DMA; False (plain pageable copies, slower) if refused."""
    cudart = torch.cuda.cudart()
    done = []
    for b in buffers:
        if cudart.cudaHostRegister(b.data_ptr(), b.numel(), 0) != cudart.cudaError.success:
            for d in done:
                cudart.cudaHostUnregister(d.data_ptr())
            try:  # the refusal is CUDA's "last error": the next launch check reports and clears it
                torch.zeros(1, device=device).add_(1)
            except RuntimeError:
                pass
            return False
        done.append(b)
    return True


class SlotLoader:
    """Run ``fill`` over ``tasks`` in ``num_workers`` processes, ``slots`` buffers of ``slot_bytes``.

    An iterator: ``start()`` launches the workers (do it before starting threads of your own, e.g. a
    progress bar: workers are forked), ``next()`` gives ``(data, description)`` in task order,
    ``close()`` stops the workers (also after an error). ``num_workers == 0`` runs ``fill`` in the
    calling process (same results, no processes). A worker that dies (killed, out of memory, a crash in
    a decoder library) ends the run with one line; any other failure of ``fill`` is re-raised with the
    worker's traceback.
    """

    def __init__(self, fill: Fill, tasks: Sequence, num_workers: int, slot_bytes: int,
                 device: torch.device | str = "cpu", slots: int | None = None):
        self.fill, self.tasks = fill, list(tasks)
        self.device = torch.device(device)
        self.num_workers = min(max(0, int(num_workers)), len(self.tasks) if len(self.tasks) > 1 else 0)
        self.n_slots = max(1, min(slots if slots is not None else 3 * max(1, self.num_workers), len(self.tasks)))
        self.slot_bytes = int(slot_bytes)
        self.buffers: list[torch.Tensor] = []
        self.workers: list = []
        self.registered = False
        self.next_seq = self.sent = 0
        self.free: collections.deque = collections.deque()
        self.arrived: dict[int, tuple[int, Any]] = {}
        self.copy_stream = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return self

    def start(self) -> "SlotLoader":
        if self.buffers:
            return self
        shared = self.num_workers > 0
        self.buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8) for _ in range(self.n_slots)]
        if shared:
            try:
                self.buffers = [b.share_memory_() for b in self.buffers]
            except RuntimeError as e:  # typically a small /dev/shm (Docker's default is 64 MB)
                mb = self.n_slots * self.slot_bytes / 2**20
                raise RaeError(f"could not allocate {mb:,.0f} MB of shared memory for the loading workers "
                               f"({str(e).splitlines()[0][:120]}); give /dev/shm more room (Docker: --shm-size=4g) "
                               "or pass fewer --num-workers") from None
            self.registered = self.device.type == "cuda" and _register(self.buffers, self.device)
            ctx = torch.multiprocessing.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.task_q, self.result_q = ctx.Queue(), ctx.Queue()
            self.workers = [ctx.Process(target=_worker, daemon=True,
                                        args=(self.fill, self.buffers, self.task_q, self.result_q, os.getpid()))
                            for _ in range(self.num_workers)]
            for w in self.workers:
                w.start()
        self.free.extend((s, None) for s in range(self.n_slots))
        return self

    def __next__(self) -> tuple[torch.Tensor, Any]:
        self.start()
        if self.next_seq >= len(self.tasks):
            self.close()
            raise StopIteration
        if not self.workers:  # in-process
            slot, done = self.free.popleft()
            if done is not None:
                done.synchronize()
            result = self.fill(self.tasks[self.next_seq], self.buffers[slot].numpy())
        else:
            while self.free and self.sent < len(self.tasks):  # keep every free buffer busy
                slot, done = self.free.popleft()
                if done is not None:
                    done.synchronize()  # the copy out of this buffer has landed (long ago, as a rule)
                self.task_q.put((self.sent, slot, self.tasks[self.sent]))
                self.sent += 1
            while self.next_seq not in self.arrived:
                self.arrived.update(self._receive())
            slot, result = self.arrived.pop(self.next_seq)
        self.next_seq += 1
        meta, nbytes = result
        data, done = self._to_device(self.buffers[slot][:nbytes])
        self.free.append((slot, done))
        return data, meta

    def _to_device(self, src: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``src``'s bytes on the device, and the event after which ``src`` may be overwritten."""
        if self.device.type != "cuda":
            return src.clone(), None
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            data = torch.empty(src.shape, dtype=torch.uint8, device=self.device)
            data.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        compute.wait_event(done)
        data.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return data, done

    def _receive(self) -> dict[int, tuple[int, Any]]:
        """The next result (seq -> (slot, meta)); raise if a worker failed or died."""
        while True:
            try:
                seq, slot, meta, error = self.result_q.get(timeout=5.0)
            except queue.Empty:
                dead = [w for w in self.workers if w.exitcode is not None]
                if dead:
                    code = dead[0].exitcode
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    raise RaeError(f"a loading worker stopped unexpectedly ({how}; out of memory?); "
                                   "run the same command again to resume") from None
                continue
            if error is not None:
                raise RuntimeError(f"a loading worker failed:\n{error}")
            return {seq: (slot, meta)}

    def close(self) -> None:
        """Stop the workers and release the buffers (idempotent)."""
        workers, self.workers = self.workers, []
        for _ in workers:
            self.task_q.put(None)
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)
        if workers:
            for q in (self.task_q, self.result_q):
                q.cancel_join_thread()
                q.close()
        if self.registered:
            torch.cuda.synchronize(self.device)
            for b in self.buffers:
                torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
            self.registered = False
        self.next_seq = len(self.tasks)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy
            pass
