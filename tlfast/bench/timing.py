"""Timing that a person can trust on a shared machine: warm-up, device synchronisation, raw samples.

``measure(fn)`` is the one timer every suite uses.  It follows ``torch.utils.benchmark.Timer``'s
rules (warm up first, synchronise CUDA around each sample, record the thread count) but keeps every
raw sample, because the schema stores them (medians and tails are computed from samples, never
reported without them) and because latency suites need each call's own time, not a block average.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99, 99.9)


def _sync_for(device: str | None) -> Callable[[], None]:
    if device and device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Samples:
    """Seconds per call, in the order measured, and what they were measured under."""

    seconds: list[float]
    threads: int
    warmup: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.seconds, p))

    def summary(self) -> dict:
        """median, p90 / p99 / p99.9 and the raw samples, as the schema stores them."""
        s = {"median_s": self.median, "min_s": float(min(self.seconds)), "runs": len(self.seconds),
             "samples_s": [float(x) for x in self.seconds], "threads": self.threads, "warmup": self.warmup,
             "load_avg_before": list(self.load_before), "load_avg_after": list(self.load_after)}
        for p in PERCENTILES[1:]:
            s[f"p{p:g}_s".replace(".", "_")] = self.percentile(p)
        s.update(self.extra)
        return s


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def measure(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1, min_time_s: float = 0.0,
            max_time_s: float = 60.0, device: str | None = None) -> Samples:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more until
    ``min_time_s`` of samples, never past ``max_time_s`` once ``repeats`` are in)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = _sync_for(device)
    load0 = os.getloadavg()
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if len(times) >= repeats and (spent >= min_time_s or spent >= max_time_s):
            break
    return Samples(times, _threads(), warmup, load0, os.getloadavg())


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 5, per_round: int = 1, warmup: int = 1,
                device: str | None = None, progress=None) -> dict[str, Samples]:
    """Contenders take turns, ``rounds`` times, ``per_round`` timed calls each: a change of load on
    a shared machine then hits every contender alike instead of the one that ran during it."""
    sync = _sync_for(device)
    load0 = os.getloadavg()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
            if progress is not None:
                progress()
    load1 = os.getloadavg()
    return {name: Samples(t, _threads(), warmup, load0, load1) for name, t in times.items()}


def concurrent_latency(call: Callable[[int], object], *, callers: int, calls_per_caller: int,
                       warmup: int = 3) -> tuple[Samples, float]:
    """Per-call latencies of ``callers`` threads each making ``calls_per_caller`` calls
    ``call(i)`` at once (``i``: the call's number, to vary the input), and the throughput in calls/s
    over the whole wall time.  Shows what a service sees: queueing on the cores and the GIL."""
    if callers < 1 or calls_per_caller < 1:
        raise ValueError(f"callers and calls_per_caller must be >= 1, got {callers}, {calls_per_caller}")
    for i in range(warmup):
        call(i)
    lat: list[list[float]] = [[] for _ in range(callers)]
    barrier = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        barrier.wait()
        try:
            for j in range(calls_per_caller):
                t = time.perf_counter()
                call(w * calls_per_caller + j)
                lat[w].append(time.perf_counter() - t)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)

    load0 = os.getloadavg()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    flat = [x for per in lat for x in per]
    return Samples(flat, _threads(), warmup, load0, os.getloadavg(), {"callers": callers}), len(flat) / wall


def wilson_interval(successes: float, trials: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (two-sided, at ``confidence``)."""
    if trials <= 0:
        return 0.0, 1.0
    z = _normal_quantile(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
               ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - lo:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
           (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    return {f"p{p:g}": float(np.percentile(seconds, p)) for p in PERCENTILES}
