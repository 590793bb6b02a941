"""The `r1lightning` command: LightningCLI with the project's modules, data and callbacks, plus the
project commands `pipeline` and `export`.

    r1lightning fit -c configs/quickstart/sft.yaml
    r1lightning fit -c configs/quickstart/grpo.yaml -c configs/strategy/ddp.yaml

Lightning, transformers and the project's modules are imported only for the command that needs them,
so `r1lightning --help` and the project commands start without them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
from pathlib import Path

from r1lightning.errors import UserError

# Every command, one line each (what `r1lightning --help` prints).
TRAINER_COMMANDS = {
    "fit": "train from YAML recipes (SFT, GRPO, distillation): r1lightning fit -c <config.yaml> [--ckpt_path last]",
    "validate": "held-out accuracy of a recipe's model: r1lightning validate -c <config.yaml>",
    "test": "run the module's test loop: r1lightning test -c <config.yaml>",
    "predict": "run the module's predict loop: r1lightning predict -c <config.yaml>",
}
# Project commands that are not Trainer methods: `r1lightning <name> ...` runs `module:main(argv)`.
PROJECT_COMMANDS = {
    "pipeline": "r1lightning.pipeline:main",
    "export": "r1lightning.export:main",
}
PROJECT_HELP = {
    "pipeline": "run a multi-stage recipe (SFT -> GRPO -> ...) and summarise it: r1lightning pipeline -c <pipeline.yaml>",
    "export": "a Lightning checkpoint to a save_pretrained directory: r1lightning export --ckpt <ckpt> --out <dir>",
}

HELP = "\n".join(
    [
        "usage: r1lightning <command> [options]     (r1lightning <command> --help for its options)",
        "",
        "commands:",
        *(f"  {name:<9} {text}" for name, text in {**TRAINER_COMMANDS, **PROJECT_HELP}.items()),
        "",
        "Errors in configs or data are printed as one line (exit status 2); R1L_TRACEBACK=1 shows the traceback.",
    ]
)


def _fail(message: str) -> None:
    print(f"r1lightning: error: {message}", file=sys.stderr)
    sys.exit(2)


def _configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("R1L_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        if not argv:
            sys.exit(2)
        return
    if argv[0] in PROJECT_COMMANDS:
        _configure_logging()
        module, func = PROJECT_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    if argv[0] not in TRAINER_COMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], [*TRAINER_COMMANDS, *PROJECT_COMMANDS], n=1)
        _fail(f"unknown command `{argv[0]}`" + (f", did you mean `{close[0]}`?" if close else f"; commands: {', '.join([*TRAINER_COMMANDS, *PROJECT_COMMANDS])}"))
    try:
        # LightningCLI's own argv reading when we were started as a program (its `args` is meant for
        # calls from Python, and warns when both are present).
        _run_lightning(None if args is None else argv)
    except (UserError, FileNotFoundError) as err:
        if os.environ.get("R1L_TRACEBACK"):
            raise
        _fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)


def __getattr__(name: str):
    # `from r1lightning.cli import R1CLI` keeps working; Lightning is imported on that first use.
    if name == "R1CLI":
        from r1lightning.lightning_cli import R1CLI

        return R1CLI
    raise AttributeError(f"module 'r1lightning.cli' has no attribute {name!r}")


def _run_lightning(args: list[str] | None) -> None:
    # Lightning gives its loggers their own handler when imported before the root logger has one;
    # configuring the root logger first would print each of its lines twice.
    from r1lightning.lightning_cli import R1CLI

    _configure_logging()
    R1CLI(args=args)


# -- config errors as one line -------------------------------------------------------------------
def config_files(argv: list[str]) -> list[str]:
    """The files given with `-c/--config`, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def init_parameters(cls) -> set[str] | None:
    """The keyword arguments `cls(...)` accepts, following `**kwargs` up the class hierarchy; None
    when some `**kwargs` goes nowhere we can read (then any key may be valid)."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        if klass is object:
            return None
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def moved_arguments(cls) -> dict[str, str]:
    """{argument `cls` no longer takes: its new place} (see `r1lightning.options.moved_arguments`)."""
    if cls is None:
        return {}
    from r1lightning.options import moved_arguments as moved

    return moved(cls)


def unknown_key(config: dict, valid_top: set[str]) -> tuple[str, str | None] | tuple[str, str | None, str] | None:
    """The first key of a parsed YAML config that no class takes: (dotted key, closest valid key), or
    (dotted key, None, its new dotted place) for an argument that moved into an option group."""
    import lightning as L

    def check(value, prefix: str, valid: set[str] | None, cls=None):
        if not isinstance(value, dict):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict) and "class_path" in item:
                        found = check(item, f"{prefix}.{i}", None)
                        if found:
                            return found
            return None
        if "class_path" in value and valid is None:
            for key in value:
                if key not in ("class_path", "init_args", "dict_kwargs", "__path__"):
                    return f"{prefix}.{key}", _closest(key, {"class_path", "init_args"})
            cls = _import(str(value["class_path"]))
            args = value.get("init_args") or {}
            params = init_parameters(cls) if cls is not None else None
            return check(args, f"{prefix}.init_args", params, cls) if isinstance(args, dict) else None
        moved = moved_arguments(cls)
        for key, sub in value.items():
            if key in moved and (valid is None or key not in valid):
                return f"{prefix}.{key}".lstrip("."), None, f"{prefix}.{moved[key]}".lstrip(".")
            if valid is not None and key not in valid:
                return f"{prefix}.{key}".lstrip("."), _closest(key, valid)
            found = check(sub, f"{prefix}.{key}", None)
            if found:
                return found
        return None

    for key, sub in config.items():
        if key not in valid_top:
            return key, _closest(key, valid_top)
        if key == "trainer" and isinstance(sub, dict):
            found = check(sub, "trainer", init_parameters(L.Trainer))
        else:
            found = check(sub, key, None)
        if found:
            return found
    return None


def _unknown_argument(argv: list[str], valid_top: set[str]) -> str | None:
    """A `--a.b.c value` argument that no class takes (model/data classes from the config files)."""
    import lightning as L
    import yaml

    classes = {}
    for name in config_files(argv):
        try:
            config = yaml.safe_load(Path(name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for group in ("model", "data"):
            if isinstance(config.get(group), dict) and "class_path" in config[group]:
                classes[group] = _import(str(config[group]["class_path"]))
    for arg in argv:
        if not arg.startswith("--") or arg in ("--config", "--print_config") or arg.startswith("--config="):
            continue
        key = arg[2:].split("=", 1)[0]
        parts = key.split(".")
        if parts[0] not in valid_top:
            close = _closest(parts[0], valid_top)
        elif parts[0] == "trainer" and len(parts) == 2:
            valid = init_parameters(L.Trainer)
            close = None if valid is None or parts[1] in valid else _closest(parts[1], valid) or "?"
        elif parts[0] in classes and len(parts) == 3 and parts[1] == "init_args" and classes[parts[0]] is not None:
            moved = moved_arguments(classes[parts[0]])
            if parts[2] in moved:
                return "command line: " + _moved(f"--{key}", f"--{parts[0]}.init_args.{moved[parts[2]]}")
            valid = init_parameters(classes[parts[0]])
            close = None if valid is None or parts[2] in valid else _closest(parts[2], valid) or "?"
        else:
            continue
        if close:
            return f"command line: unknown argument `--{key}`" + (f", did you mean `{close}`?" if close != "?" else "")
    return None


def _moved(key: str, new: str) -> str:
    from r1lightning.options import moved_error

    return moved_error(key, new)


def _closest(key: str, valid) -> str | None:
    close = difflib.get_close_matches(key, sorted(valid or ()), n=1, cutoff=0.6)
    return close[0] if close else None


def explain_config_error(argv: list[str], valid_top: set[str], message: str) -> str:
    """One line for a config the parser rejected: the unknown key, its file and the closest valid
    key, when a key is unknown; else the first line of the parser's message."""
    import yaml

    for name in config_files(argv):
        path = Path(name)
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            return f"{name}: cannot read the config: {str(err).splitlines()[0]}"
        if not isinstance(config, dict):
            return f"{name}: a config is a mapping of keys, got {type(config).__name__}"
        found = unknown_key(config, valid_top)
        if found:
            if len(found) == 3:
                return f"{name}: " + _moved(found[0], found[2])
            key, close = found
            return f"{name}: unknown key `{key}`" + (f", did you mean `{close}`?" if close else "")
    found = _unknown_argument(argv, valid_top)
    if found:
        return found
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "invalid arguments"
    return first + (" (R1L_TRACEBACK=1 for the parser's full message)" if len(lines) > 1 else "")


if __name__ == "__main__":
    main(sys.argv[1:])
