"""Stage callbacks (importable as `r1lightning.callbacks`)."""
