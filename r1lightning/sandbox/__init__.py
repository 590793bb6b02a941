"""Sandboxed execution of untrusted, model-written programs against trusted tests.

The verdict is decided outside the candidate's process: ``judge.py`` runs the tests and talks to
``candidate.py`` (the program, alone in its own sandbox) over a data-only channel (``codec.py``);
``isolation.py`` locks each process down; ``host.py`` starts both and reads the verdict. See the
README section "Sandboxed code execution" for the threat model.
"""

from .host import (
    SandboxConfig,
    SandboxJob,
    SandboxResult,
    SandboxUnavailable,
    run_program,
    run_programs,
    sandbox_capabilities,
)

__all__ = ["SandboxConfig", "SandboxJob", "SandboxResult", "SandboxUnavailable", "run_program", "run_programs",
           "sandbox_capabilities"]  # fmt: skip
