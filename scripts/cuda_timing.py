"""Timing on the GPU for the benchmark scripts: CUDA events around each call, after a warm-up."""

from __future__ import annotations

import statistics

import torch


def time_cuda(fn, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(median ms, every call's ms) of `fn` over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times
