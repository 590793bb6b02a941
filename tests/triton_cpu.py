"""Triton on a machine without a GPU: kernels run by Triton's interpreter (`TRITON_INTERPRET=1`, in a
subprocess because the variable is read when Triton is imported), and kernels compiled ahead of time for
a Hopper GPU (sm_90: H100/H200) with the ptxas that Triton's wheel ships, so a kernel that would not
build on the GPU fails here first. CPU torch wheels do not ship Triton; tests that need it skip."""

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


def compile_for_hopper(fn, types: dict, constants: dict, aligned=(), num_warps: int = 4, num_stages: int = 3):
    """Compile the @triton.jit `fn` for sm_90 as its launcher would: `types` of the runtime arguments
    ("*bf16", "i32", ...), `constants` for constexpr arguments and for integers the launcher specialises
    (a stride of 1), `aligned` the arguments it would see as multiples of 16 (names `fn` lacks are
    ignored, so one list serves a kernel family). Returns the compiled kernel
    (`.asm["ttgir"]`, `.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned if name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def registers_per_thread(compiled) -> int:
    """Registers a thread of the compiled kernel uses, from the ptxas that Triton ships (`ptxas -v` on its PTX)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    found = re.search(r"Used (\d+) registers", out.stdout + out.stderr)
    assert found, (out.stdout + out.stderr)[-2000:]
    return int(found.group(1))
