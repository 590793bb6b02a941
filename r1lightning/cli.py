"""The `r1lightning` command: LightningCLI with the project's modules, data and callbacks.

    r1lightning fit -c configs/quickstart/sft.yaml
    r1lightning fit -c configs/quickstart/grpo.yaml -c configs/strategy/ddp.yaml
"""

from __future__ import annotations

import logging
import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from r1lightning.errors import UserError


class R1CLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)


# Project commands that are not Trainer methods: `r1lightning <name> ...` runs `module:main(argv)`.
PROJECT_COMMANDS = {
    "pipeline": "r1lightning.pipeline:main",
    "export": "r1lightning.export:main",
}


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("R1L_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in PROJECT_COMMANDS:
        import importlib

        module, func = PROJECT_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    # Library modules import their optional pieces lazily; the CLI imports the classes YAML may name.
    import r1lightning.grpo  # noqa: F401
    import r1lightning.sft  # noqa: F401
    import r1lightning.data  # noqa: F401

    try:
        R1CLI(args=argv)
    except (UserError, FileNotFoundError) as err:
        if os.environ.get("R1L_TRACEBACK"):
            raise
        print(f"r1lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
