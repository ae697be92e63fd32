"""Where a build's partitions run: lanes, threads that each take one partition at a time.

A lane takes partitions from a shared `Feed` until none is left. On the CPU a lane is one core running
single-threaded products and scans, so no core waits for another.
On a CUDA device a lane is a thread with its share of the CPU threads for reading and its own CUDA
stream, so one lane's host→device copy and another's reading or Parquet writing overlap the device's
computing; copies go through pinned (page-locked) host memory, which the device reads asynchronously.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

ACCELERATOR_LANES = 3  # one reading, one computing, one writing


class Feed:
    """Items handed to the lanes one at a time, in order, from any thread; after `stop` none."""

    def __init__(self, items: Iterable) -> None:
        self._items, self._lock, self._stopped = iter(items), threading.Lock(), False

    def __iter__(self) -> Feed:
        return self

    def __next__(self):
        with self._lock:
            if self._stopped:
                raise StopIteration
            return next(self._items)

    def stop(self) -> None:
        self._stopped = True


def lane_shape(device: torch.device, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, torch threads per lane) for a device: by default one lane per core on the CPU and
    ACCELERATOR_LANES on an accelerator, the cores shared out among them (lanes that each ran every
    core's OpenMP threads at once would oversubscribe the cores)."""
    threads = torch.get_num_threads()
    lanes = lanes or (threads if device.type == "cpu" else ACCELERATOR_LANES)
    return lanes, max(1, threads // lanes)


@contextmanager
def lane_pool(lanes: int, per_lane: int, device: torch.device = torch.device("cpu")) -> Iterator[ThreadPoolExecutor]:
    """Threads that each run torch ops on `per_lane` threads (and on CUDA, on a stream of their own);
    torch's thread count is restored after, because a lane's setting is also torch's global one."""
    threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the lanes' streams do not wait for work queued before them

    def start_lane() -> None:
        torch.set_num_threads(per_lane)
        if device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.Stream(device))  # the calling thread's current stream

    try:
        with ThreadPoolExecutor(lanes, "atlas-lane", initializer=start_lane) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: on CUDA copied from pinned memory, queued on the lane's stream; a no-op on the CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
