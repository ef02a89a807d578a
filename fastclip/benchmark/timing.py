"""Timing: repeated calls with warm-up, the memory floor, and a time limit for compiles.

CPU: ``time.perf_counter`` around each call. GPU: CUDA events around each
call, with the L2 cache flushed before it (so that a list smaller than L2
is not timed from cache) and the device idle when the first event is
recorded (so the window holds the host's enqueue time wherever it exceeds
the GPU's work), and the host time to enqueue the call taken with
``perf_counter`` in the same loop.

The CPU's caches are not flushed. Every list but two is larger than a
server's last-level cache, and a flat buffer's floor measured the same with
and without a flush (42 MB of bf16 on a 32 MB L3: 0.83 and 0.86 ms). A
flush also evicts the tensors' own metadata, which the backward pass of a
real step has just touched: it made 10,000 separate tensors 40% slower to
walk, a cost a training loop does not pay.
"""
from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

# The GPU flush buffer is this many times the L2 size: reading it evicts
# everything a previous call left in L2 (a read, not a write, so that no
# dirty lines are left to be written back inside the next timed call).
L2_FLUSH_FACTOR = 2
# The GPU copy-bandwidth floor is measured on a buffer far larger than any
# L2 (H200: 60 MiB), so that it is DRAM bandwidth.
GPU_BANDWIDTH_BYTES = 1 << 30
# L2 size assumed where the device reports none (0, as under MIG on some
# drivers): larger than any L2 so far (H200: 60 MiB), so the flush still flushes.
L2_UNKNOWN_BYTES = 256 << 20
# GPU warm-up: before each block of timed calls, reads of the flush buffer
# for at least this long. An idle GPU's clock drops (345 MHz seen on an idle
# H200), as it idles while the host checks results between cases; one call
# of a few microseconds would not raise it. Reads, not calls of the method:
# every clip call shrinks the gradients (cases.CLIP_DECAY).
GPU_WARMUP_MS = 25.0


@dataclass
class Sample:
    """Timed calls of one method: device times and the host time of each call (ms)."""

    times_ms: list[float]
    host_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)


class Timer:
    """Warm-up calls, then at least ``min_repeats`` timed calls and more until
    ``target_s`` seconds are spent or ``max_repeats`` calls are made.

    Slow calls (a 5 GB list on a CPU) get few repeats and fast ones many, so
    that a run of every set stays within minutes.
    """

    def __init__(self, device: torch.device, warmup: int, min_repeats: int, max_repeats: int, target_s: float):
        self.device, self.warmup = device, warmup
        self.min_repeats, self.max_repeats, self.target_s = min_repeats, max(max_repeats, min_repeats), target_s
        self._flush: Optional[torch.Tensor] = None
        if device.type == "cuda":
            l2 = torch.cuda.get_device_properties(device).L2_cache_size or L2_UNKNOWN_BYTES
            self._flush = torch.ones(L2_FLUSH_FACTOR * l2 // 4, dtype=torch.int32, device=device)
            # Made and recorded once here: an event is created on its first
            # record, which would otherwise fall inside the timed window
            # (found in review).
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for event in self._events:
                event.record()
            torch.cuda.synchronize(device)

    def _warm_up(self, fn: Callable[[], object], before: Callable[[], object]) -> None:
        if self._flush is not None:
            t0 = time.perf_counter()
            while (time.perf_counter() - t0) * 1e3 < GPU_WARMUP_MS:
                for _ in range(8):
                    self._flush.sum()
                torch.cuda.synchronize(self.device)  # the GPU's time, not the queue's
        for _ in range(self.warmup):
            before()
            fn()

    def __call__(
        self, fn: Callable[[], object], block: int = 0, blocks: int = 1, before: Callable[[], object] = lambda: None
    ) -> Sample:
        """Time ``fn``: block ``block`` of ``blocks`` blocks of calls of the
        same method (at most ``max_repeats`` and at least ``min_repeats``
        calls over all blocks, each block at least one; the time target split
        evenly). ``before`` runs before each call, outside the timed window."""
        least = max(1, _part(self.min_repeats, block, blocks))
        most = max(least, _part(self.max_repeats, block, blocks))
        target = self.target_s / blocks
        self._warm_up(fn, before)
        times: list[float] = []
        host: list[float] = []
        spent = 0.0
        if self._flush is not None:
            torch.cuda.synchronize(self.device)
        while len(times) < least or (spent < target and len(times) < most):
            before()
            if self._flush is not None:
                self._flush.sum()
                # The GPU idles when the window opens: a method whose enqueue
                # is slower than its kernels pays all of it (host-bound lists
                # are what this benchmark is about), none hidden behind the flush.
                torch.cuda.synchronize(self.device)
                start, end = self._events
                start.record()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                host.append(times[-1])
            spent += times[-1] / 1e3
        return Sample(times, host)


def _part(total: int, block: int, blocks: int) -> int:
    """Block ``block``'s share of ``total`` split over ``blocks`` (the first ones get the remainder)."""
    return total // blocks + (1 if block < total % blocks else 0)


class Floors:
    """What memory allows for the work of each case, in ms, for a list of ``nbytes``.

    CPU: measured on one float32 buffer of the same bytes, in this run: one
    read pass (``sum``) for the norm, the per-tensor norms and a clip that
    writes nothing; a read pass plus one in-place multiply (``mul_``) for a
    clip that rescales. The floor is timed before every round of a case's
    methods and after the last (see Runner._time_rounds): a shared
    machine's memory bandwidth drifts by 1.6x within minutes (measured on
    the development VM), so a floor timed once per list compared some rows
    with another machine. The fastest of the floor's calls is taken: a
    floor is a bound, and the fastest call is the one least
    disturbed by the rest of the machine. GPU: the same
    traffic (1 or 3 times the bytes) over the device copy bandwidth,
    measured once per run.
    """

    def __init__(self, device: torch.device, timer: Timer):
        self.device, self.timer = device, timer
        self.gpu_bandwidth: Optional[float] = None  # bytes per ms
        # One CPU buffer, grown to the largest list and kept: its pages are
        # touched once (first touch costs more than the floor itself).
        self._buffer: Optional[torch.Tensor] = None
        if device.type == "cuda":
            src = torch.ones(GPU_BANDWIDTH_BYTES, dtype=torch.uint8, device=device)  # written: no untouched pages
            dst = torch.empty_like(src)
            copy_ms = timer(lambda: dst.copy_(src)).median
            self.gpu_bandwidth = 2 * GPU_BANDWIDTH_BYTES / copy_ms
            del src, dst

    def computed(self, nbytes: int) -> Optional[dict[str, float]]:
        """GPU: ``{"read": ms, "read+scale": ms}`` for a list of ``nbytes``; CPU: None (see ``calls``)."""
        if self.gpu_bandwidth is None:
            return None
        return {"read": nbytes / self.gpu_bandwidth, "read+scale": 3 * nbytes / self.gpu_bandwidth}

    def calls(self, nbytes: int) -> dict[str, Callable[[], object]]:
        """CPU: the floor's work for a list of ``nbytes``, to time next to a row's calls."""
        numel = max(nbytes // 4, 1)
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = None  # free the old one first
            self._buffer = torch.ones(numel, dtype=torch.float32, device=self.device)
        buf = self._buffer[:numel]
        return {"read": lambda: buf.sum(), "read+scale": lambda: (buf.sum(), buf.mul_(0.9999999))}

    def release(self) -> None:
        self._buffer = None

    def describe(self) -> str:
        if self.gpu_bandwidth is not None:
            return f"bytes moved / device copy bandwidth ({self.gpu_bandwidth / 1e6:.0f} GB/s, measured)"
        return ("one float32 buffer of the same bytes: sum (read), sum + mul_ (read+scale), "
                "timed before every round of a case's methods and after the last; the fastest call")


class TimeLimitExceeded(BaseException):
    """Raised inside a call that ran past its time limit.

    A BaseException, so that torch.compile's own ``except Exception``
    handlers do not swallow it halfway through a compile.
    """


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[bool]:
    """Interrupt the body with TimeLimitExceeded after ``seconds`` (SIGALRM).

    Yields whether the limit is enforced: not off the main thread or where
    there is no SIGALRM (Windows); the body then runs unbounded.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def _expire(signum, frame):
        raise TimeLimitExceeded(f"did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
