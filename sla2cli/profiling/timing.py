"""Latency and peak memory of a callable, the way each device is measured properly.

CUDA: every time `triton.testing.do_bench` takes (warm-up excluded, L2 flushed between runs); launch-bound
callables can also be timed as a CUDA graph of several calls, so kernel launches stop dominating. CPU:
`torch.utils.benchmark` with a stated number of threads. Either way the repeats are summarised by
`torch.utils.benchmark.Measurement`: median and interquartile range (`Timing`), so noise shows.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# Below this eager median (ms) a callable counts as launch-bound and is also timed in a CUDA graph.
LAUNCH_BOUND_MS = 1.0
# Calls captured per CUDA graph aim at about this much GPU time per replay (at most GRAPH_MAX_CALLS).
GRAPH_TARGET_MS = 2.0
GRAPH_MAX_CALLS = 100
# At least this many timed samples per median (CPU; CUDA stretches do_bench's rep to reach it).
CPU_MIN_SAMPLES = 5
CUDA_MIN_SAMPLES = 10
# Before the first measurement on CUDA, keep the GPU busy this long so its clocks have ramped up.
CUDA_WARMUP_MS = 500.0


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over repeated measurements: median and interquartile range."""

    ms: float
    iqr_ms: float
    samples: int

    @classmethod
    def of(cls, measurement, scale: float = 1.0) -> "Timing":
        """From a `torch.utils.benchmark.Measurement` (seconds per run), each time multiplied by `scale`."""
        return cls(ms=measurement.median * 1e3 * scale, iqr_ms=measurement.iqr * 1e3 * scale,
                   samples=len(measurement.times))

    @classmethod
    def from_ms(cls, times_ms: list[float], scale: float = 1.0) -> "Timing":
        """From single-call times in milliseconds (CUDA events), each multiplied by `scale`."""
        benchmark = _torch_benchmark()
        task = benchmark.utils.common.TaskSpec(stmt="fn()", setup="pass")
        return cls.of(benchmark.Measurement(1, [t / 1e3 for t in times_ms], task), scale)


@dataclass
class Timer:
    """Times callables on one device; `describe()` says how, for the report."""

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_run_time: float = 0.2  # CPU: seconds per measurement
    threads: int | None = None  # CPU: default torch.get_num_threads()

    def __post_init__(self):
        if self.device.type == "cpu" and self.threads is None:
            self.threads = torch.get_num_threads()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict:
        if self.is_cuda:
            return {"method": f"triton.testing.do_bench, median and IQR (warm-up excluded, L2 flushed between "
                              f"runs, at least {CUDA_MIN_SAMPLES} samples)",
                    "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                    "cuda_graphs": f"also for callables under {LAUNCH_BOUND_MS} ms eager (launch-bound): "
                                   f"median of graph replays of up to {GRAPH_MAX_CALLS} calls, per call"}
        return {"method": f"torch.utils.benchmark, median and IQR (at least {CPU_MIN_SAMPLES} samples)",
                "threads": self.threads, "min_run_time_s": self.min_run_time}

    def eager(self, fn: Callable[[], object]) -> Timing:
        """Milliseconds of one call: median and IQR over the repeats."""
        if self.is_cuda:
            with torch.cuda.device(self.device):
                return Timing.from_ms(_cuda_bench(fn, self.warmup_ms, self.rep_ms))
        benchmark = _torch_benchmark()
        fn()  # warm-up, outside the measurement
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        measured = timer.blocked_autorange(min_run_time=self.min_run_time)
        # a slow call: still several samples, single calls merged into the same Measurement
        extra = [timer.timeit(1) for _ in range(CPU_MIN_SAMPLES - len(measured.times))]
        return Timing.of(benchmark.Measurement.merge([measured, *extra])[0] if extra else measured)

    def warm_up(self, fn: Callable[[], object]) -> None:
        """On CUDA, run `fn` for CUDA_WARMUP_MS so the first measurement does not see idle clocks."""
        if not self.is_cuda:
            return
        with torch.cuda.device(self.device):
            calls = max(1, int(CUDA_WARMUP_MS / _estimate_ms(fn, 1)))
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

    def graph(self, fn: Callable[[], object], eager_ms: float) -> Timing | None:
        """Milliseconds per call inside a CUDA graph; None off CUDA or if `fn` cannot be captured."""
        if not self.is_cuda:
            return None
        calls = max(1, min(GRAPH_MAX_CALLS, math.ceil(GRAPH_TARGET_MS / max(eager_ms, 1e-3))))
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a failed capture also warns that the graph is empty
                    with torch.cuda.graph(graph):
                        for _ in range(calls):
                            fn()
            except Exception:  # not capturable (a host sync, a host-to-device copy): eager numbers stand alone
                torch.cuda.synchronize()
                return None
            try:
                return Timing.from_ms(_cuda_bench(graph.replay, self.warmup_ms, self.rep_ms), scale=1 / calls)
            finally:
                del graph
                torch.cuda.synchronize()

    def peak_memory(self, fn: Callable[[], object]) -> int | None:
        """Peak bytes allocated on the device while `fn` runs once (resident weights included); None on CPU."""
        if not self.is_cuda:
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def _torch_benchmark():
    """torch.utils.benchmark, without the CUDA_HOME notice its import logs on machines without CUDA."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


def _estimate_ms(fn: Callable[[], object], calls: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end) / calls, 1e-3)


def _cuda_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's times (ms), with warm-up and repetitions stretched so slow calls still get several samples."""
    estimate = _estimate_ms(fn)
    warmup_ms, rep_ms = max(warmup_ms, 2 * estimate), max(rep_ms, CUDA_MIN_SAMPLES * estimate)
    try:
        import triton.testing
    except ImportError:
        return _cuda_events_times(fn, warmup_ms, rep_ms)
    return [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]


def _cuda_events_times(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's procedure without Triton: estimate, warm up, then time single calls (ms)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / estimate))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return times


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What the numbers were measured on: device name, dtype, torch / triton / CUDA versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}
