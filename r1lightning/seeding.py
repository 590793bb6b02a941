"""Per-step random seeds: every training batch starts from a seed derived from (seed_everything's
seed, epoch, batch index, rank), so what a step samples depends only on what a checkpoint holds."""

from __future__ import annotations

import hashlib
import random

import torch


def step_seed(base: int, *parts: int) -> int:
    key = "/".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass

