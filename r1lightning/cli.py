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


class R1CLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("R1L_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # Library modules import their optional pieces lazily; the CLI imports the classes YAML may name.
    import r1lightning.grpo  # noqa: F401
    import r1lightning.sft  # noqa: F401
    import r1lightning.data  # noqa: F401

    R1CLI(args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
