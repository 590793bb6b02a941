"""SDPA's cuDNN kernel for the attention shapes a run keeps seeing (`Policy.cudnn_attention: auto`).

cuDNN's attention is the fastest SDPA kernel on Hopper at the update's shapes, but it builds an
execution plan for each new shape: ~3 ms of host time per call (H200, 2026-11-30), where flash and
memory-efficient attention need none. Fixed-length steps repeat their micro-batch shapes every step, so
planning happens once; long-tailed lengths make new packed-row shapes every step, and planning them
cost 2.8 s of a 12 s GRPO step. `auto` therefore lets cuDNN run a micro-batch only when its input shape
appeared in one of the last `window` steps, and decides for a whole micro-batch (its forward and the
backward that recomputes its checkpointed layers), so one micro-batch never mixes kernels.
"""

from __future__ import annotations

import contextlib

import torch


class RecurringShapes:
    """Which micro-batch shapes may use cuDNN attention: those that ran in an earlier step, at most `window`
    steps ago. `next_step()` at each step's start; `allow(shape)` per micro-batch pass. The answer depends
    only on earlier steps, so every pass over a shape within a step (reference, update) gets the same one."""

    def __init__(self, window: int = 8):
        self.window = window
        self.step = 0
        self.previous: dict[tuple, int] = {}  # shape -> the last earlier step it ran in
        self.current: set[tuple] = set()

    def next_step(self) -> None:
        for shape in self.current:
            self.previous[shape] = self.step
        self.current.clear()
        self.step += 1
        for shape in [s for s, k in self.previous.items() if self.step - k > self.window]:
            del self.previous[shape]  # long-tailed runs make new shapes every step: forget the old ones

    def allow(self, shape: tuple) -> bool:
        self.current.add(shape)
        return shape in self.previous


@contextlib.contextmanager
def cudnn_attention(enabled: bool):
    """SDPA may (or may not) pick cuDNN inside the block; the process's setting is restored after."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
