"""Datasets by name (TRL / open-r1 recipes): a `datasets.load_dataset` spec, column mapping and
gold-answer extraction.

A spec is what `load_dataset` takes, as YAML: `{path: openai/gsm8k, name: main, split: train}`, or a
local dataset-repository directory as `path` (files laid out as on the Hub, configs declared in its
README). Offline (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`) `datasets` reads its cache; a dataset
that is neither cached nor reachable is a one-line `DataError`.
"""

from __future__ import annotations

from typing import Any

import datasets

from r1lightning.data.io import DataError, check_rows

ANSWER_FORMATS = ("gsm8k", "boxed", "auto")


def spec_name(spec: dict | str) -> str:
    """`path[/name]:split`, for messages."""
    spec = {"path": spec} if isinstance(spec, str) else spec
    name = f"/{spec['name']}" if spec.get("name") else ""
    return f"{spec.get('path')}{name}:{spec.get('split', 'train')}"


def load_dataset_spec(spec: dict | str) -> datasets.Dataset:
    """`datasets.load_dataset(**spec)` for one split (default `train`), errors on one line."""
    spec = {"path": spec} if isinstance(spec, str) else dict(spec)
    if not spec.get("path"):
        raise DataError(f"data.dataset: needs `path` (a Hub dataset name or a local dataset directory); got {spec}")
    if spec.get("streaming"):
        raise DataError(f"dataset {spec_name(spec)}: streaming is not supported (the rows are held in memory)")
    spec.setdefault("split", "train")
    where = f"dataset {spec_name(spec)}"
    try:
        ds = datasets.load_dataset(**spec)
    except Exception as err:  # datasets raises a dozen types (not found, offline, bad config, bad split)
        msg = " ".join(str(err).split())
        if len(msg) > 300:
            msg = msg[:300] + "..."
        raise DataError(f"{where}: cannot load ({type(err).__name__}: {msg})") from err
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{where}: expected one split, got {type(ds).__name__}; set `split`")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows (empty split)")
    return ds


def rename_columns(ds: datasets.Dataset, rename: dict[str, str], where: str) -> datasets.Dataset:
    """Rename `{source: target}` columns; a target that exists already is replaced (open-r1 overwrites
    `prompt` the same way)."""
    for src, dst in rename.items():
        if src == dst:
            continue
        if src not in ds.column_names:
            raise DataError(f"{where}: no column {src!r} (columns: {', '.join(ds.column_names)})")
        if dst in ds.column_names:
            ds = ds.remove_columns(dst)
        ds = ds.rename_column(src, dst)
    return ds


def extract_gold(value: Any, fmt: str) -> str | None:
    """The final answer inside a reference solution.

    `gsm8k`: the text after the last `####` (thousands separators dropped: `1,000` -> `1000`);
    `boxed`: the content of the last `\\boxed{}` (MATH-style solutions);
    `auto`: `gsm8k` if the text has `####`, else `boxed` if it has `\\boxed`, else the text stripped.
    None when the format's marker is missing.
    """
    if value is None:
        return None
    text = str(value)
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if "\\boxed" in text else None
        if fmt is None:
            return text.strip()
    if fmt == "gsm8k":
        if "####" not in text:
            return None
        return text.rsplit("####", 1)[1].strip().replace(",", "") or None
    if fmt == "boxed":
        from r1lightning.rewards.reasoning import last_boxed

        boxed = last_boxed(text)
        return boxed.strip() if boxed is not None else None
    raise ValueError(f"unknown answer format {fmt!r}; expected one of {', '.join(ANSWER_FORMATS)}")


def add_answers(ds: datasets.Dataset, column: str, fmt: str | None, where: str, log) -> datasets.Dataset:
    """Set `answer` from `column` (extracted with `fmt`); the source column stays as it is."""
    if column not in ds.column_names:
        raise DataError(f"{where}: no answer column {column!r} (columns: {', '.join(ds.column_names)})")
    if fmt is not None and fmt not in ANSWER_FORMATS:
        raise DataError(f"data.answer_format: {fmt!r} is not one of {', '.join(ANSWER_FORMATS)}")
    values = ds[column]
    answers = [extract_gold(v, fmt) if fmt else (None if v is None else str(v)) for v in values]
    missing = [i for i, (v, a) in enumerate(zip(values, answers)) if v is not None and a is None]
    if missing:
        log.warning(
            "data: %s: %d of %d rows have no %s answer in column %r (first: row %d); their gold answer is None",
            where, len(missing), len(ds), fmt, column, missing[0],
        )
    if "answer" in ds.column_names:
        ds = ds.remove_columns("answer")
    return ds.add_column("answer", answers)


def as_conversation(ds: datasets.Dataset, system_prompt: str | None) -> datasets.Dataset:
    """String prompts -> `[system?, user]` message lists in `prompt` (open-r1's conversation mapping), so
    reward functions receive messages and completions as `[{"role": "assistant", ...}]`."""
    if "prompt" not in ds.column_names or not isinstance(ds[0]["prompt"], str):
        return ds

    def convert(row):
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": msgs + [{"role": "user", "content": row["prompt"]}]}

    return ds.map(convert)


__all__ = ["ANSWER_FORMATS", "add_answers", "as_conversation", "check_rows", "extract_gold", "load_dataset_spec", "rename_columns", "spec_name"]
