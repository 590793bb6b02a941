"""r1lightning: DeepSeek-R1-style reasoning training on PyTorch Lightning."""

__version__ = "0.1.0"

__all__ = ["Policy", "__version__"]


def __getattr__(name: str):
    # `r1lightning.Policy` (the name YAML recipes use) imports torch and transformers; only on first use,
    # so `r1lightning --help` and the project commands start without them.
    if name == "Policy":
        from r1lightning.policy import Policy

        return Policy
    raise AttributeError(f"module 'r1lightning' has no attribute {name!r}")
