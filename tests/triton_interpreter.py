"""Running Triton kernels on the CPU: Triton's interpreter (`TRITON_INTERPRET=1`), in a subprocess because
the variable is read when Triton is imported. CPU torch wheels do not ship Triton; tests that need it skip."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (CPU torch wheels do not ship it)")


def run_interpreted(code: str, timeout: int = 300) -> None:
    """Run `code` under the interpreter from the project root; it must exit 0 and print `ok` last."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
