"""LightningDataModules: traces for SFT, prompts (+ gold answers and any extra columns) for RL.

Both take files (JSONL, Parquet, `save_to_disk` directories), a `datasets.load_dataset` spec (a Hub
dataset by name or a local dataset-repository directory, see `r1lightning.data.hub`) or a synthetic
`task` that writes its files on first use. The tokenizer comes from the LightningModule at `setup` (or `connect` in
scripts), so configs never name it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from r1lightning.data.chat import PromptCollator, SFTCollator, encode_conversation, encode_prompt, require_chat_template, row_messages
from r1lightning.data import hub
from r1lightning.data.io import DataError, check_rows, load_rows
from r1lightning.tasks import SyntheticTask

log = logging.getLogger(__name__)

PROMPT_FIELDS = (("prompt", "messages"),)


class _FilesAndTokenizer:
    """What every data module of the project shares: files for a split (given, or the task's generated
    ones) and the tokenizer (connected, or the attached module's)."""

    def task_files(self, split: str) -> list[str] | None:
        given = self.train_files if split == "train" else self.val_files
        if given is not None:
            return [given] if isinstance(given, str) else list(given)
        if self.task is not None:
            return [str(self.task.directory(self.data_dir) / f"{'train' if split == 'train' else 'test'}.jsonl")]
        return None

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def attached_tokenizer(self):
        if self.tokenizer is None and self.trainer is not None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        if self.tokenizer is None:
            raise RuntimeError("data: no tokenizer; call connect(tokenizer) or attach to a Trainer")
        return self.tokenizer


class _BaseDataModule(_FilesAndTokenizer, L.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        task: SyntheticTask | None = None,
        data_dir: str = "data/generated",
        batch_size: int = 16,
        val_batch_size: int = 64,
        max_length: int = 512,
        max_val_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        system_prompt: str | None = None,
        dataset: dict | str | None = None,
        val_dataset: dict | str | None = None,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        answer_column: str | None = None,
        answer_format: str | None = None,
        conversational: bool = False,
    ):
        """
        Args:
            dataset: training rows by name instead of files: a `datasets.load_dataset` spec such as
                `{path: openai/gsm8k, name: main, split: train}`, or a local dataset-repository directory
                as `path`. Offline, `datasets` reads its cache.
            val_dataset: the same for validation prompts.
            prompt_column: the column holding the prompt (renamed `prompt`; e.g. `problem`, `question`).
            messages_column: the column holding conversations (renamed `messages`).
            answer_column: the column holding the gold answer or a reference solution; its extracted
                answer becomes `answer` (what the `accuracy` reward reads); the column itself stays.
            answer_format: how to extract it: `gsm8k` (after `####`), `boxed` (last `\boxed{}`),
                `auto` (either, else the text); default: the value as it is.
            conversational: turn string prompts into `[system, user]` message lists (open-r1's
                convention): reward functions then receive messages and `[{"role": "assistant", ...}]`.
        """
        super().__init__()
        if task is None and train_files is None and dataset is None:
            raise ValueError("data: give `train_files`, a `dataset` spec or a synthetic `task`")
        if train_files is not None and dataset is not None:
            raise ValueError("data: give `train_files` or `dataset`, not both")
        if answer_format is not None and answer_format not in hub.ANSWER_FORMATS:
            raise ValueError(f"data.answer_format: {answer_format!r} is not one of {', '.join(hub.ANSWER_FORMATS)}")
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.prompt_column = prompt_column
        self.messages_column = messages_column
        self.answer_column = answer_column
        self.answer_format = answer_format
        self.conversational = conversational
        self.train_files = train_files
        self.val_files = val_files
        self.task = task
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_length = max_length
        self.max_val_samples = max_val_samples
        self.num_workers = num_workers
        self.seed = seed
        self.system_prompt = system_prompt
        self.tokenizer = None
        self.train_rows = self.val_rows = None

    # -- files -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.task is not None:
            self.task.write(self.data_dir)  # rank 0 only; skipped when the files exist

    def files(self, split: str) -> list[str] | None:
        """Paths for `split`; with a `dataset` spec, a one-element list holding the spec (`read_rows` loads it)."""
        spec = self.dataset if split == "train" else self.val_dataset
        if spec is not None:
            return [{"path": spec} if isinstance(spec, str) else dict(spec)]
        return self.task_files(split)

    # -- tokenizer ---------------------------------------------------------------------------
    def _tokenizer(self):
        tokenizer = self.attached_tokenizer()
        require_chat_template(tokenizer)
        return tokenizer

    # -- rows: files or a dataset by name, then the column mapping ------------------------------
    def read_rows(self, files: Sequence, any_of: Sequence[Sequence[str]] = (), required: Sequence[str] = ()):
        """Rows from files or a `load_dataset` spec, with `prompt_column` / `messages_column` renamed,
        `answer` extracted from `answer_column`, and string prompts made conversations if asked.
        `required`: columns every row must have once mapped (file:line errors where no mapping applies)."""
        rename = {k: v for k, v in ((self.prompt_column, "prompt"), (self.messages_column, "messages")) if k}
        by_name = len(files) == 1 and isinstance(files[0], dict)
        where = f"dataset {hub.spec_name(files[0])}" if by_name else ", ".join(map(str, files))
        if by_name:
            rows = hub.load_dataset_spec(files[0])
        else:  # checked after the mapping when there is one
            plain = not rename and not self.answer_column
            rows = load_rows(files, required=required if plain else (), any_of=() if rename else any_of)
        if rename or by_name:
            rows = hub.rename_columns(rows, rename, where)
            check_rows(rows, (), any_of, where)
        if self.answer_column:
            rows = hub.add_answers(rows, self.answer_column, self.answer_format, where, log)
        if required and (by_name or not plain):
            check_rows(rows, required, (), where)
        if self.conversational:
            rows = hub.as_conversation(rows, self.system_prompt)
        return rows

    # -- prompts (RL and evaluation) ---------------------------------------------------------
    def load_prompts(self, files: Sequence[str], limit: int | None = None, required: dict[str, str] | None = None):
        """`required`: column -> the reward that needs it; a row without it stops the load."""
        tok = self._tokenizer()
        try:
            rows = self.read_rows(files, any_of=PROMPT_FIELDS, required=list(required or ()))
        except DataError as err:
            needed_by = next((f"the `{r}` reward needs it" for c, r in (required or {}).items() if f"'{c}'" in str(err)), None)
            raise DataError(f"{err} ({needed_by})" if needed_by else str(err)) from None
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        system_prompt = self.system_prompt

        def encode(row):
            return {"prompt_ids": encode_prompt(tok, row_messages(row, system_prompt))}

        rows = rows.map(encode)
        return self._drop_long(rows, "prompt_ids", files)

    def _drop_long(self, rows, key: str, files):
        lengths = [len(x) for x in rows[key]]
        keep = [i for i, n in enumerate(lengths) if n <= self.max_length]
        if len(keep) < len(rows):
            first = next(i for i, n in enumerate(lengths) if n > self.max_length)
            where = f"{', '.join(f'dataset {hub.spec_name(f)}' if isinstance(f, dict) else str(f) for f in files)}: row {first}"
            if not keep:
                raise DataError(f"{where}: every row is longer than max_length={self.max_length}")
            log.warning(
                "data: skipped %d of %d rows longer than max_length=%d (first: %s, %d tokens)",
                len(rows) - len(keep), len(rows), self.max_length, where, lengths[first],
            )
            self.skipped_rows = len(rows) - len(keep)
            rows = rows.select(keep)
        return rows

    def _prompt_loader(self, rows, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            rows,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            collate_fn=PromptCollator(self._tokenizer().pad_token_id, self.system_prompt),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def setup(self, stage: str | None = None) -> None:
        self._tokenizer()  # fail early without one, whatever the stage
        if self.train_rows is None and stage in (None, "fit"):
            self.train_rows = self.load_train(self.files("train"))
        val_files = self.files("val")
        if self.val_rows is None and val_files:
            self.val_rows = self.load_prompts(val_files, self.max_val_samples)

    def load_train(self, files: list[str]):
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader | list:
        if self.val_rows is None:
            return []
        return self._prompt_loader(self.val_rows, self.val_batch_size, shuffle=False)


class TraceDataModule(_BaseDataModule):
    """SFT on reasoning traces: rows are `prompt` + `completion`, or `messages`; loss on assistant tokens.

    Validation yields held-out prompts with their gold answers (for generated-answer accuracy).
    """

    def __init__(self, *args, packing: bool = False, **kwargs):
        """
        Args:
            packing: lay several examples end to end in one row of `max_length` (attention stays
                within each example); fewer pad tokens per step.
        """
        super().__init__(*args, **kwargs)
        self.packing = packing

    def load_train(self, files: list[str]):
        tok = self._tokenizer()
        rows = self.read_rows(files, any_of=(("completion", "messages"),) + PROMPT_FIELDS)
        system_prompt = self.system_prompt

        def encode(row):
            ids, labels = encode_conversation(tok, row_messages(row, system_prompt))
            return {"input_ids": ids, "labels": labels}

        rows = rows.map(encode, remove_columns=rows.column_names)
        return self._drop_long(rows, "input_ids", files)

    def train_dataloader(self) -> DataLoader:
        tok = self._tokenizer()
        return DataLoader(
            self.train_rows.with_format(None),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=SFTCollator(tok.pad_token_id, self.max_length, self.packing),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )


def reward_columns(module) -> dict[str, str]:
    """Column -> reward name, for the rewards of `module` that declare the columns they read
    (a reward's `columns` attribute, e.g. `accuracy` needs `answer`)."""
    composer = getattr(module, "rewards", None)
    needed = {}
    for reward in getattr(composer, "rewards", None) or []:
        if getattr(reward, "kinds", None) is not None:  # routed: rows of other kinds need not have its columns
            continue
        fn = getattr(reward, "_callable", reward)
        for column in getattr(fn, "columns", None) or getattr(reward, "columns", None) or ():
            needed.setdefault(column, reward.name)
    return needed


class PromptDataModule(_BaseDataModule):
    """RL prompts: `prompt` (or `messages`) plus every other column, which reaches the reward functions
    unchanged (`answer`, `test`, `language`, ...)."""

    def load_train(self, files: list[str]):
        return self.load_prompts(files, required=reward_columns(self.trainer.lightning_module if self.trainer else None))

    def train_dataloader(self) -> DataLoader:
        return self._prompt_loader(self.train_rows, self.batch_size, shuffle=True)
