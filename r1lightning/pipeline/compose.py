"""One stage's config from its recipes and the pipeline: plain dicts in, a plain dict out (no files read).

The rules, in order:
1. the recipe files are merged (dicts recursively; an entry with another `class_path` replaces the
   whole entry; lists are replaced);
2. `overrides` are applied (pipeline-wide, then the stage's, then the command line's; keys like
   `trainer.callbacks.0.init_args.x` index lists), then the stage's `callbacks` are appended;
3. paths under the recipe's own `trainer.default_root_dir` (logs, checkpoints, export) move under
   the stage directory; a CSV logger is added when the recipe has none (the summary reads it);
4. a `fit` stage exports to `<stage_dir>/model`; `StageReport` is appended last, so it sees what
   the other callbacks logged;
5. a stage that starts from an earlier stage's model loads it as the policy's `name_or_path` (the
   recipe's `config`/`tokenizer` are dropped: the export holds both); `data_from` files become the
   data module's `train_files`;
6. `${run_dir}`, `${stage_dir}`, `${<stage>.dir}` and `${<stage>.model}` are replaced in strings.

Where a stage config is read or written, the key is one of the names below, not a literal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from r1lightning.pipeline.spec import PipelineError

# The keys of a LightningCLI config that the pipeline reads or writes.
ROOT_DIR = "trainer.default_root_dir"
LOGGER = "trainer.logger"
CALLBACKS = "trainer.callbacks"
EXPORT_DIR = "model.init_args.export_dir"  # PolicyModule(export_dir=...)
POLICY_ARGS = "model.init_args.policy.init_args"  # Policy(name_or_path=..., config=..., tokenizer=...)
TRAIN_FILES = "data.init_args.train_files"  # the data modules' train_files
STAGE_REPORT = "r1lightning.callbacks.StageReport"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


def merge(base: Any, over: Any) -> Any:
    """`over` merged into `base` (copies): dicts recursively; an entry with another `class_path`
    replaces the old one whole (its init_args belong to another class); anything else replaces."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    if "class_path" in base and "class_path" in over and base["class_path"] != over["class_path"]:
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists (numeric parts index lists, negative from the end)."""
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise PipelineError(f"override {key}: {part!r} is not an index of a list of {len(node)}") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise PipelineError(f"override {key}: {'.'.join(parts[:i])} is not a mapping or a list")


def get_dotted(config: dict, key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_strings(v, fn) for v in obj]
    return obj


def callbacks(config: dict) -> list:
    cbs = get_dotted(config, CALLBACKS) or []
    return cbs if isinstance(cbs, list) else [cbs]


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compose(
    recipes: Iterable[dict],
    stage_dir: Path,
    *,
    name: str,
    command: str = "fit",
    overrides: Iterable[tuple[str, Any]] = (),
    extra_callbacks: Iterable[dict] = (),
    model: str | None = None,
    train_files: list[str] | None = None,
    placeholders: dict[str, str] | None = None,
) -> dict:
    """The complete config of stage `name` (the rules are in the module docstring).

    recipes: the stage's recipe files, parsed, in order. overrides: (dotted key, value) pairs in the
    order they apply. model: the export directory of the stage it starts from (None: the recipe's
    own policy). train_files: replaces the data module's (None: keep them). placeholders: the value
    of every `${...}` that may occur (`run_dir`, `stage_dir`, `<stage>.dir`, `<stage>.model`).
    """
    config: dict = {}
    for recipe in recipes:
        config = merge(config, recipe or {})
    for key, value in overrides:
        set_dotted(config, key, copy.deepcopy(value))
    extra_callbacks = list(extra_callbacks)
    if extra_callbacks:
        set_dotted(config, CALLBACKS, callbacks(config) + copy.deepcopy(extra_callbacks))

    here = str(stage_dir)
    old_root = get_dotted(config, ROOT_DIR)
    if old_root:
        old_root = str(old_root).rstrip("/")

        def reroot(s: str) -> str:
            if s == old_root or s.startswith(old_root + "/"):
                return here + s[len(old_root):]
            return s

        config = map_strings(config, reroot)
    set_dotted(config, ROOT_DIR, here)
    loggers = get_dotted(config, LOGGER)
    if loggers is None or loggers is True:
        set_dotted(config, LOGGER, [{"class_path": CSV_LOGGER, "init_args": {"save_dir": here, "name": "logs"}}])

    if command == "fit":
        set_dotted(config, EXPORT_DIR, str(Path(here) / "model"))
    report = {"class_path": STAGE_REPORT, "init_args": {"path": str(Path(here) / "stage_report.json")}}
    set_dotted(config, CALLBACKS, callbacks(config) + [report])
    if model is not None:
        policy = get_dotted(config, POLICY_ARGS)
        if not isinstance(policy, dict):
            raise PipelineError(f"stage {name}: model_from needs {POLICY_ARGS} in its config")
        policy.pop("config", None)
        policy.pop("tokenizer", None)  # the export holds its own tokenizer
        policy["name_or_path"] = model
    if train_files is not None:
        set_dotted(config, TRAIN_FILES, list(train_files))

    values = dict(placeholders or {})

    def substitute(s: str) -> str:
        def repl(m: re.Match) -> str:
            if m.group(1) not in values:
                raise PipelineError(f"stage {name}: unknown placeholder ${{{m.group(1)}}} (known: {', '.join(sorted(values))})")
            return values[m.group(1)]

        return _PLACEHOLDER.sub(repl, s)

    return map_strings(config, substitute)
