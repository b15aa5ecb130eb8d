"""Timing and plotting helpers shared by the attention and generate benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_time_us(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median time of one isolated call of ``fn`` in microseconds: CUDA events around the call and a
    synchronization after it on GPU (the host's time to issue the call is inside), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def stream_time_us(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 3,
                   groups: int = 5) -> float:
    """Device time per call with calls issued back to back, as a decode loop issues them (the host
    runs ahead, so its per-call overhead is hidden while it stays below the device time): the median
    over ``groups`` of (events around ``reps`` calls) / reps. CPU: the same as ``median_time_us``."""
    if device.type != "cuda":
        return median_time_us(fn, device, reps=reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def run() -> None:
        for _ in range(reps):
            fn()

    return _events_per_call_us(run, reps, groups)


def graph_time_us(fn: Callable[[], Any], reps: int = 20, groups: int = 5) -> float:
    """Device time per call with no host time at all: ``reps`` calls captured in one CUDA graph, the
    median over ``groups`` replays of (events around a replay) / reps. GPU only; ``fn`` must be
    capturable (no host synchronization, no allocation outside the caching allocator)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch's capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _events_per_call_us(graph.replay, reps, groups)


def _events_per_call_us(run: Callable[[], Any], calls: int, groups: int) -> float:
    """Median over ``groups`` of (CUDA events around ``run``, which issues ``calls`` calls) / calls, µs."""
    times = []
    for _ in range(groups):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = median_time_us(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def plot_lines(path: str, title: str, panels: dict[str, dict[str, list[tuple[float, float]]]], xlabel: str,
               ylabel: str) -> None:
    """One subplot per panel; one line per method of (x, y) points; log-log axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib missing: no plot written to {path})")
        return
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for method, pts in lines.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
