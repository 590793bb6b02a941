"""r1lightning: DeepSeek-R1-style reasoning training on PyTorch Lightning."""

from r1lightning.policy import Policy

__version__ = "0.1.0"

__all__ = ["Policy", "__version__"]
