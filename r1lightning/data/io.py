"""Reading row datasets (JSONL, Parquet, `datasets.save_to_disk` directories) with errors that name
the file, the line and the field.

`datasets` does the loading; its errors on malformed JSON are long tracebacks without a line
number, so JSONL files are validated line by line first (cheap: the files we read are small next
to the training run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import datasets

from r1lightning.errors import UserError

datasets.disable_progress_bars()


class DataError(UserError):
    """Bad input data. The message is one line: `file:line: what is wrong`."""


def _as_list(paths: str | Sequence[str] | None) -> list[str]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, Path)) else [str(p) for p in paths]


def _check_jsonl(path: Path, required: Sequence[str], any_of: Sequence[Sequence[str]]) -> int:
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            _check_row(row, required, any_of, f"{path}:{lineno}")
            n += 1
    return n


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_row(row: dict, required: Sequence[str], any_of: Sequence[Sequence[str]], where: str) -> None:
    for key in required:
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}'")
    for group in any_of:
        if not any(row.get(k) is not None for k in group):
            raise DataError(f"{where}: missing field, need one of {', '.join(repr(k) for k in group)}")
    for key in ("prompt", "completion"):
        value = row.get(key)
        if value is None or isinstance(value, str) or _is_messages(value) or (key == "prompt" and isinstance(value, list)):
            continue
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    for key in ("messages", "prompt"):  # a list-valued prompt is a conversation (TRL's format)
        msgs = row.get(key)
        if msgs is None or (key == "prompt" and isinstance(msgs, str)):
            continue
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{where}: field '{key}' must be a list of {{role, content}} objects")


def check_rows(ds: datasets.Dataset, required: Sequence[str], any_of: Sequence[Sequence[str]], where: str) -> None:
    """`_check_row` on every row of a loaded dataset; errors name `where: row i`."""
    if not required and not any_of and not ({"prompt", "completion", "messages"} & set(ds.column_names)):
        return
    for i, row in enumerate(ds):
        _check_row(row, required, any_of, f"{where}: row {i}")


def load_rows(
    paths: str | Sequence[str],
    required: Sequence[str] = (),
    any_of: Sequence[Sequence[str]] = (),
) -> datasets.Dataset:
    """Load and concatenate JSONL / Parquet files and `save_to_disk` directories into one Dataset.

    `required`: fields every row must have; `any_of`: groups of which at least one field is needed.
    """
    parts = []
    for raw in _as_list(paths):
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError as err:
                raise DataError(f"{path}: not a datasets.save_to_disk directory ({err})") from None
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path}: is a DatasetDict ({', '.join(ds)}); point at one split's directory")
        elif path.suffix in (".jsonl", ".json"):
            if _check_jsonl(path, required, any_of) == 0:
                raise DataError(f"{path}: no rows (empty file)")
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                num_rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
            if num_rows == 0:
                raise DataError(f"{path}: no rows (empty dataset)")
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise DataError(f"{path}: unsupported format (use .jsonl, .parquet or a save_to_disk directory)")
        if path.is_dir() or path.suffix == ".parquet":  # JSONL was checked line by line above
            check_rows(ds, required, any_of, str(path))
        if len(ds) == 0:
            raise DataError(f"{path}: no rows (empty dataset)")
        parts.append(ds)
    if not parts:
        raise DataError("no data files given")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
