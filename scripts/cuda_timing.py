"""Timing on the GPU for the benchmark scripts: CUDA events around each call, after a warm-up; `time_graph`
captures the calls in one CUDA graph first (as the engines' decode steps run)."""

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


def time_graph(fn, warmup: int, iters: int) -> tuple[float, list[float]]:
    """`time_cuda` of one replay of a CUDA graph holding `fn` (one eager call on a side stream first, as
    capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, warmup, iters)
