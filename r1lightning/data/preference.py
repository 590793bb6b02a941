"""Preference data for reward models: chosen / rejected pairs, or pointwise labels.

Rows (JSONL, Parquet or `save_to_disk` directories, as every data module here reads them):

- pairs, plain:           {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0?}
- pairs, conversational:  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  (`prompt` may be left out when `chosen` / `rejected` are whole conversations: TRL's implicit prompt)
- pointwise:              {"prompt": ..., "completion": ..., "label": 1}  (e.g. safe = 1, unsafe = 0)

`reward_text` is how a (prompt, completion) pair becomes the reward model's input, here and in the
reward that scores rollouts (`r1lightning.rewards.reward_model`), so training and use agree: the
tokenizer's chat template over [user: prompt, assistant: completion] when it has one, else the two
texts end to end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from r1lightning.data.datamodules import _FilesAndTokenizer
from r1lightning.data.io import DataError, load_rows
from r1lightning.tasks import SyntheticTask

log = logging.getLogger(__name__)

FORMATS = ("auto", "pairs", "pointwise")


def _messages(value: Any, role: str) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(m) for m in value]


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "".join(str(m["content"]) for m in value)


def reward_text(tokenizer, prompt: Any, completion: Any) -> str:
    """The text a reward model reads for `completion` (str or assistant messages) answering `prompt`
    (str, messages or None)."""
    if getattr(tokenizer, "chat_template", None):
        messages = _messages(prompt, "user") + _messages(completion, "assistant")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return _plain(prompt) + _plain(completion)


def encode_reward_texts(tokenizer, texts: list[str], max_length: int | None) -> tuple[list[list[int]], int]:
    """Token ids per text (the chat template carries its own special tokens); texts longer than
    `max_length` keep their last `max_length` tokens (where the answer is). Returns (ids, #truncated)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    truncated = 0
    if max_length:
        for i, x in enumerate(ids):
            if len(x) > max_length:
                ids[i] = x[-max_length:]
                truncated += 1
    return ids, truncated


def right_pad(ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


@dataclass
class PreferenceCollator:
    """Pairs: chosen rows then rejected rows in one [2B, T] batch (one forward scores both);
    pointwise: [B, T] and `labels` [B]. Right padding; the score head reads the last real token."""

    pad_token_id: int
    pointwise: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.pointwise:
            input_ids, mask = right_pad([e["ids"] for e in examples], self.pad_token_id)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([float(e["label"]) for e in examples])}
        input_ids, mask = right_pad([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], self.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"] or 0.0) for e in examples])
        return batch


class PreferenceDataModule(_FilesAndTokenizer, L.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        task: SyntheticTask | None = None,
        data_dir: str = "data/generated",
        format: str = "auto",
        batch_size: int = 16,
        val_batch_size: int = 64,
        max_length: int = 512,
        max_val_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            train_files, val_files: JSONL / Parquet / `save_to_disk` directories (see the module doc).
            task: a synthetic task whose `train.jsonl` / `test.jsonl` hold preference rows (e.g.
                `r1lightning.tasks.InstructionTask`); used where the files are not given.
            format: `pairs` (chosen / rejected), `pointwise` (completion + label) or `auto` (from
                the first file's columns).
            batch_size: pairs (or labelled rows) per step.
            max_length: longer inputs keep their last `max_length` tokens.
        """
        super().__init__()
        if task is None and train_files is None:
            raise DataError("data: give `train_files` or a synthetic `task`")
        if format not in FORMATS:
            raise DataError(f"data.format: {format!r} is not one of {', '.join(FORMATS)}")
        self.train_files, self.val_files, self.task, self.data_dir = train_files, val_files, task, data_dir
        self.format = format
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_length, self.max_val_samples = max_length, max_val_samples
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.train_rows = self.val_rows = None

    def prepare_data(self) -> None:
        if self.task is not None:
            self.task.write(self.data_dir)

    def files(self, split: str) -> list[str] | None:
        return self.task_files(split)

    def _tokenizer(self):
        return self.attached_tokenizer()

    def load(self, files: list[str], limit: int | None = None):
        tok = self._tokenizer()
        fmt = self.format
        if fmt == "auto":
            first = load_rows(files[:1])
            fmt = "pairs" if {"chosen", "rejected"} <= set(first.column_names) else "pointwise"
        required = ("chosen", "rejected") if fmt == "pairs" else ("completion", "label")
        rows = load_rows(files, required=required)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        self.pointwise = fmt == "pointwise"
        prompts = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
        max_length = self.max_length
        out: dict[str, list] = {}
        truncated = 0
        keys = ("completion",) if self.pointwise else ("chosen", "rejected")
        for key in keys:
            texts = [reward_text(tok, p, c) for p, c in zip(prompts, rows[key])]
            ids, n = encode_reward_texts(tok, texts, max_length)
            out["ids" if self.pointwise else f"{key}_ids"] = ids
            truncated += n
        if self.pointwise:
            labels = rows["label"]
            for i, v in enumerate(labels):
                if isinstance(v, bool) or (isinstance(v, (int, float)) and 0 <= float(v) <= 1):
                    continue
                raise DataError(f"{', '.join(files)}: row {i}: field 'label' must be a number in [0, 1] or a boolean, got {v!r}")
            out["label"] = [float(v) for v in labels]
        elif "margin" in rows.column_names:
            out["margin"] = rows["margin"]
        if truncated:
            log.warning("data: %d inputs longer than max_length=%d kept their last %d tokens (%s)", truncated, max_length, max_length, ", ".join(files))
        return [dict(zip(out, values)) for values in zip(*out.values())]

    def setup(self, stage: str | None = None) -> None:
        self._tokenizer()
        if self.train_rows is None and stage in (None, "fit"):
            self.train_rows = self.load(self.files("train"))
        val = self.files("val")
        if self.val_rows is None and val:
            self.val_rows = self.load(val, self.max_val_samples)

    def _loader(self, rows, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            rows, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=PreferenceCollator(self._tokenizer().pad_token_id, self.pointwise),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, self.batch_size, shuffle=True)

    def val_dataloader(self):
        return [] if self.val_rows is None else self._loader(self.val_rows, self.val_batch_size, shuffle=False)
