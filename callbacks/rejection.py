"""Rejection sampling: sample k completions per prompt with the live policy, keep those that pass
the filters, and write them as a trace dataset for the next SFT stage (DeepSeek-R1, stage 3).

Files, for `output: runs/x/traces.jsonl`:

    runs/x/traces.jsonl              the dataset (or .parquet), written once, atomically
    runs/x/traces.jsonl.stats.json   counts and pass rates
    runs/x/traces.jsonl.parts/       progress: manifest.json + chunk-<first prompt>.json files

Every chunk file holds the samples *and scores* of a set of prompts and is written atomically,
so the set of chunk files is the record of which prompts are done: a re-run after an
interruption samples only the prompts no chunk covers, and the merge reads every chunk once, so
nothing is duplicated. Filters run at the merge, so changing a threshold re-filters without
re-sampling. The manifest records what was sampled (files, k, sampling parameters, a fingerprint
of the policy weights and the step); chunks from another policy are discarded, not mixed in.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from r1lightning.callbacks._common import (barrier, crossed_multiple, log_metrics, needs_lockstep, rank_and_world, write_json,
                                          write_table)
from r1lightning.callbacks.rejection_filters import RejectionFilters
from r1lightning.options import SamplingOptions, coerce, moved_into
from r1lightning.tasks import SyntheticTask

log = logging.getLogger(__name__)


class RejectionSampling(Callback):
    """Write a trace dataset of the policy's own passing samples.

    Rows: `prompt` (or `messages` with the assistant turn appended), `completion`, `answer`, the
    prompt file's other columns, and metadata: `prompt_index`, `sample_index`, `source_model` (at
    `fit_end`: the export directory the sampling policy is saved to; otherwise the run directory
    and step), `source_init` (where that policy started), `source_step`, `scores` (every reward),
    `reward` (weighted total), `num_tokens`, `sampling`. Which samples are kept: `RejectionFilters`.

    Distributed: the pending prompts are cut into chunks of `batch_size`; rank r samples chunks
    r, r + world, ...; after a barrier rank 0 merges the chunk files. Each chunk is seeded from
    its first prompt's index, so the samples do not depend on the number of ranks. Under DDP the
    bare policy generates (no collectives), so ranks may do unequal work; under FSDP generation
    gathers the shards (a collective), so a rank with fewer chunks samples throwaway ones to
    keep every rank making the same calls.
    """

    # The flat arguments of earlier versions and where they went.
    moved_arguments = {**moved_into(SamplingOptions, "sampling"), **moved_into(RejectionFilters, "filters")}

    def __init__(
        self,
        output: str,
        prompt_files: str | list[str] | None = None,
        task: SyntheticTask | None = None,
        data_dir: str = "data/generated",
        sampling: SamplingOptions = SamplingOptions(num_samples=4),
        filters: RejectionFilters = RejectionFilters(),
        when: str = "fit_end",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        rewards: list | None = None,
        max_prompts: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        system_prompt: str | None = None,
    ):
        """
        Args:
            output: the dataset path; `.jsonl` or `.parquet`. Periodic rounds write
                `<stem>-step<N><suffix>` next to it.
            prompt_files: JSONL/Parquet rows with `prompt` (or `messages`), `answer` and any columns
                the rewards read; default: the training files of the run's data module.
            task: instead of `prompt_files`, a `SyntheticTask` whose train split (written under
                `data_dir` if missing) gives the prompts; e.g. more problems than the run trains
                on, for distillation data.
            sampling: `num_samples` (k) completions per prompt and how they are sampled
                (`r1lightning.options.SamplingOptions`).
            filters: which samples are kept (`RejectionFilters`).
            when: `fit_end` (when training ends), `validate_end` (after `r1lightning validate`:
                sample from a finished model, e.g. a teacher, without training) or `never` (only
                the periodic triggers).
            every_n_steps, every_n_epochs: also run every N optimizer steps / epochs.
            rewards: how samples are scored; default the module's `rewards` (GRPO), else
                accuracy + format.
            max_prompts: use only the first N prompts.
            batch_size: prompts per generate call (and per progress chunk).
            seed: base sampling seed; the training RNG state is left untouched.
            system_prompt: prepended as a system message when encoding prompts; default: the data
                module's `system_prompt`, so prompts look as they did in training.
        """
        sampling = coerce(SamplingOptions, sampling, "RejectionSampling.sampling")
        filters = coerce(RejectionFilters, filters, "RejectionSampling.filters")
        if when not in ("fit_end", "validate_end", "never"):
            raise ValueError(f"RejectionSampling: when must be fit_end, validate_end or never, got {when!r}")
        if Path(output).suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"RejectionSampling: output must end in .jsonl or .parquet, got {output!r}")
        if sampling.num_samples < 1 or batch_size < 1:
            raise ValueError("RejectionSampling: sampling.num_samples and batch_size must be >= 1")
        self.prompt_files = [prompt_files] if isinstance(prompt_files, str) else prompt_files
        self.task = task
        self.data_dir = data_dir
        self.output = output
        self.sampling = sampling
        self.filters = filters
        self.when = when
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.rewards = list(rewards) if rewards is not None else None
        self.max_prompts = max_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.system_prompt = system_prompt
        self.sampler = None  # a `Sampler`; None uses the module's default (tests inject stubs)
        self.last_stats: dict | None = None
        self.written: list[str] = []
        self._last_step = 0

    @classmethod
    def stage_outputs(cls, init_args: dict) -> list[str]:
        """The dataset a pipeline stage with this callback (these init_args) has written by its end:
        `output`, unless the callback only runs periodically (`when: never`)."""
        args = inspect.signature(cls).bind_partial(**init_args)
        args.apply_defaults()
        return [str(args.arguments["output"])] if args.arguments["when"] in ("fit_end", "validate_end") else []

    # -- triggers ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps and crossed_multiple(self._last_step, step, self.every_n_steps)
        self._last_step = step
        if due:
            self.run(trainer, pl_module, self.round_output(step))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module, self.round_output(trainer.global_step))

    def on_train_end(self, trainer, pl_module) -> None:
        # Not on_fit_end: that runs after the strategy's teardown, when the model may have left
        # its device; here every rank is still connected.
        if self.when == "fit_end":
            self.run(trainer, pl_module, Path(self.output))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.when == "validate_end" and trainer.state.fn == "validate":
            self.run(trainer, pl_module, Path(self.output))

    def round_output(self, step: int) -> Path:
        out = Path(self.output)
        return out.with_name(f"{out.stem}-step{step:06d}{out.suffix}")

    # -- the work ----------------------------------------------------------------------------
    def run(self, trainer, pl_module, output: str | Path | None = None) -> dict:
        """Sample the pending prompts (this rank's share), then rank 0 merges and writes `output`.
        Callable outside a Trainer (`trainer=None`) for a single process."""
        output = Path(output or self.output)
        parts = output.with_name(output.name + ".parts")
        rank, world = rank_and_world(trainer)
        step = int(getattr(trainer, "global_step", 0) or 0)
        files = self._files(trainer)
        rows = self._load_prompts(files)
        composer = self._composer(pl_module)
        # The prompts are encoded as in training unless told otherwise.
        system_prompt = self.system_prompt if self.system_prompt is not None else getattr(getattr(trainer, "datamodule", None), "system_prompt", None)
        parts.mkdir(parents=True, exist_ok=True)
        manifest = None  # rank 0 checks and merges; the weights fingerprint is a pass over every parameter
        if rank == 0:
            manifest = self._manifest(trainer, pl_module, composer, files, len(rows), step, system_prompt)
            self._check_manifest(parts, manifest)
        barrier(trainer, "rejection_manifest")

        done = {i for chunk in _read_chunks(parts) for i in chunk["prompt_indices"]}
        pending = [i for i in range(len(rows)) if i not in done]
        chunks = [pending[j : j + self.batch_size] for j in range(0, len(pending), self.batch_size)]
        mine = chunks[rank::world]
        if rank == 0:
            log.info("rejection sampling: %d prompts, %d done before, %d chunks over %d rank(s)", len(rows), len(done), len(chunks), world)
        t0 = time.perf_counter()
        for chunk in mine:
            samples = self._sample_chunk(pl_module, composer, rows, chunk, system_prompt)
            write_json(parts / f"chunk-{chunk[0]:08d}.json", {"prompt_indices": chunk, "samples": samples})
        if needs_lockstep(trainer) and chunks:
            # FSDP: generation is a collective; a rank with one chunk fewer samples a throwaway one.
            for _ in range(-(-len(chunks) // world) - len(mine)):
                self._generate_chunk(pl_module, rows, chunks[0], system_prompt)  # thrown away: not scored
        barrier(trainer, "rejection_sampled")

        stats: dict = {}
        if rank == 0:
            kept, stats = self.merge(rows, _read_chunks(parts), manifest)
            stats["seconds_sampling_rank0"] = time.perf_counter() - t0
            write_table(output, kept)
            write_json(output.with_name(output.name + ".stats.json"), stats)
            log.info("rejection sampling: kept %d of %d samples (%.1f%%) for %d prompts -> %s",
                     stats["kept"], stats["sampled"], 100 * stats["pass_rate"], stats["prompts"], output)  # fmt: skip
            log_metrics(trainer, {f"rejection/{k}": stats[k] for k in
                                  ("sampled", "passed", "kept", "pass_rate", "kept_per_prompt", "sampled_per_prompt", "prompts_covered")})  # fmt: skip
        self.last_stats = stats
        self.written.append(str(output))
        barrier(trainer, "rejection_written")
        return stats

    # -- prompts and scoring -----------------------------------------------------------------
    def _files(self, trainer) -> list[str]:
        if self.prompt_files is not None:
            return list(self.prompt_files)
        if self.task is not None:
            return [str(self.task.write(self.data_dir)["train"])]  # atomic; every rank may call it
        datamodule = getattr(trainer, "datamodule", None)
        files = datamodule.files("train") if datamodule is not None and hasattr(datamodule, "files") else None
        if not files:
            raise ValueError("RejectionSampling: no prompt_files given and the data module has no training files")
        return list(files)

    def _load_prompts(self, files: list[str]) -> list[dict]:
        from r1lightning.data import load_rows

        ds = load_rows(files, any_of=(("prompt", "messages"),))
        if self.max_prompts is not None:
            ds = ds.select(range(min(self.max_prompts, len(ds))))
        return ds.to_list()

    def _composer(self, pl_module):
        from r1lightning.rewards import Reward, RewardComposer

        if self.rewards is not None:
            rewards = list(self.rewards)
        elif getattr(pl_module, "rewards", None) is not None:
            rewards = list(pl_module.rewards.rewards)
        else:
            rewards = [Reward("accuracy"), Reward("format")]
        names = {r.name for r in rewards}
        for name, kwargs in self.filters.required_rewards():
            if name not in names:
                rewards.append(Reward(name, weight=0.0, kwargs=kwargs))
                names.add(name)
        missing = sorted(set(self.filters.min_scores) - names)
        if missing:
            raise ValueError(f"RejectionSampling: min_scores names rewards {missing} that are not among {sorted(names)}")
        return RewardComposer(rewards)

    def _manifest(self, trainer, pl_module, composer, prompt_files: list[str], num_prompts: int, step: int, system_prompt: str | None) -> dict:
        files = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size if Path(f).is_file() else None} for f in prompt_files]
        return {
            "prompt_files": files,
            "num_prompts": num_prompts,
            "num_samples": self.sampling.num_samples,
            "sampling": self.sampling_info(),
            "rewards": composer.names,
            "system_prompt": system_prompt,
            "seed": self.seed,
            "source_model": _source_model(trainer, pl_module, step, self.when),
            "source_init": _source_init(pl_module),
            "source_step": step,
            "policy_fingerprint": weights_fingerprint(getattr(pl_module, "model", None)),
        }

    def _check_manifest(self, parts: Path, manifest: dict) -> None:
        path = parts / "manifest.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old == manifest:
                return
            changed = sorted(k for k in manifest if old.get(k) != manifest[k])
            log.warning("rejection sampling: %s holds samples of another run (%s differ); starting over", parts, ", ".join(changed))
            shutil.rmtree(parts)
            parts.mkdir(parents=True)
        write_json(path, manifest)

    def sampling_info(self) -> dict:
        o = self.sampling
        return {"num_samples": o.num_samples, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k,
                "max_new_tokens": o.max_new_tokens}  # fmt: skip

    @torch.no_grad()
    def _generate_chunk(self, pl_module, rows: list[dict], chunk: list[int], system_prompt: str | None):
        """The chunk's k samples per prompt (under FSDP a collective: every rank calls it as often)."""
        from r1lightning.data.chat import encode_prompt, left_pad, row_messages

        tok = pl_module.tokenizer
        k = self.sampling.num_samples
        ids = [encode_prompt(tok, row_messages(_prompt_only(rows[i]), system_prompt)) for i in chunk]
        prompt_ids, mask = left_pad(ids, tok.pad_token_id)
        device = getattr(pl_module, "device", torch.device("cpu"))
        prompt_ids, mask = prompt_ids.to(device).repeat_interleave(k, 0), mask.to(device).repeat_interleave(k, 0)
        params = self.sampling.params()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + chunk[0])  # per chunk: independent of ranks and resumes
            return pl_module.generate(prompt_ids, mask, params, sampler=self.sampler)

    def _sample_chunk(self, pl_module, composer, rows: list[dict], chunk: list[int], system_prompt: str | None) -> list[dict]:
        k = self.sampling.num_samples
        batch = [rows[i] for i in chunk]
        rollout = self._generate_chunk(pl_module, rows, chunk, system_prompt)
        columns = {key: [r.get(key) for r in batch for _ in range(k)] for key in batch[0] if key not in _RESERVED_COLUMNS}
        from r1lightning.data.chat import reward_prompt

        # Reward functions get the prompts as TRL passes them (strings, or message lists for chat rows).
        prompts = [reward_prompt(_prompt_only(r), system_prompt) for r in batch for _ in range(k)]
        scores = pl_module.score(rollout, columns, composer, reward_prompts=prompts)
        completions, lengths = scores.completions, rollout.completion_lengths.tolist()
        samples = []
        for j in range(len(completions)):
            samples.append({
                "prompt_index": chunk[j // k],
                "sample_index": j % k,
                "completion": completions[j],
                "num_tokens": int(lengths[j]),
                "truncated": bool(rollout.truncated[j]),
                "scores": {name: _finite(v[j]) for name, v in scores.per_fn.items()},
                "reward": float(scores.total[j]),
            })
        return samples

    # -- filtering and the dataset -----------------------------------------------------------
    def passes(self, sample: dict) -> bool:
        return self.filters.passes(sample)

    def merge(self, rows: list[dict], chunks: list[dict], manifest: dict) -> tuple[list[dict], dict]:
        """The kept rows (ordered by prompt, then sample) and the statistics."""
        by_prompt: dict[int, list[dict]] = {}
        for chunk in chunks:
            for s in chunk["samples"]:
                by_prompt.setdefault(s["prompt_index"], []).append(s)
        kept: list[dict] = []
        sampled = passed = duplicates = covered = 0
        score_sums: dict[str, list[float]] = {}
        for i in sorted(by_prompt):
            samples = sorted(by_prompt[i], key=lambda s: s["sample_index"])
            sampled += len(samples)
            for s in samples:
                for name, v in s["scores"].items():
                    if v is not None:
                        score_sums.setdefault(name, []).append(v)
            good, n_passed, n_duplicates = self.filters.select(samples)
            passed += n_passed
            duplicates += n_duplicates
            covered += bool(good)
            kept.extend(self._row(rows[i], s, manifest) for s in good)
        prompts = len(by_prompt)
        stats = {
            "prompts": prompts,
            "sampled": sampled,
            "passed": passed,
            "duplicates": duplicates,
            "kept": len(kept),
            "pass_rate": passed / sampled if sampled else 0.0,
            "kept_per_prompt": len(kept) / prompts if prompts else 0.0,
            "sampled_per_prompt": sampled / prompts if prompts else 0.0,
            "prompts_covered": covered / prompts if prompts else 0.0,
            "mean_scores": {name: sum(v) / len(v) for name, v in score_sums.items()},
            "source_model": manifest["source_model"],
            "source_init": manifest["source_init"],
            "source_step": manifest["source_step"],
            "sampling": manifest["sampling"],
        }
        return kept, stats

    def _row(self, row: dict, sample: dict, manifest: dict) -> dict:
        out = {k: v for k, v in row.items() if k not in ("prompt", "messages", "completion", "answer")}
        if row.get("messages") is not None:
            out["messages"] = _prompt_only(row)["messages"] + [{"role": "assistant", "content": sample["completion"]}]
        else:
            out["prompt"] = row["prompt"]
        out["completion"] = sample["completion"]
        out["answer"] = None if row.get("answer") is None else str(row["answer"])
        out.update(
            prompt_index=sample["prompt_index"],
            sample_index=sample["sample_index"],
            source_model=manifest["source_model"],
            source_init=manifest["source_init"],
            source_step=manifest["source_step"],
            scores=sample["scores"],
            reward=sample["reward"],
            num_tokens=sample["num_tokens"],
            sampling=manifest["sampling"],
        )
        return out


_RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "prompt_ids")


def _prompt_only(row: dict) -> dict:
    # The prompt file may carry a reference trace (`completion`); the policy must not see it.
    out = {k: v for k, v in row.items() if k != "completion"}
    if out.get("messages") and out["messages"][-1]["role"] == "assistant":
        out["messages"] = out["messages"][:-1]
    return out


def _finite(v) -> float | None:
    v = float(v)
    return None if v != v else v  # NaN means "reward did not apply"


def _source_model(trainer, pl_module, step: int, when: str) -> str:
    export = getattr(getattr(pl_module, "hparams", None), "export_dir", None) if hasattr(pl_module, "hparams") else None
    state = getattr(getattr(trainer, "state", None), "fn", None)
    if export and when == "fit_end" and state == "fit":
        return str(export)  # exported right after this callback, with exactly these weights
    if state == "validate":
        return _source_init(pl_module)  # validate does not train: the samples come from the loaded model
    root = getattr(trainer, "default_root_dir", None) or "run"
    return f"{root}@step{step}"


def _source_init(pl_module) -> str:
    policy = getattr(pl_module, "policy", None)
    name = getattr(policy, "name_or_path", None)
    if name:
        return str(name)
    return "config:" + str((getattr(policy, "config", None) or {}).get("model_type", "unknown"))


def weights_fingerprint(model) -> str | None:
    """A short hash of the weights: chunks sampled from other weights are not reused."""
    if model is None:
        return None
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            t = p.detach()
            if hasattr(t, "to_local"):  # FSDP shard: the fingerprint is per rank there
                t = t.to_local()
            h.update(repr(float(t.double().sum())).encode())
    return h.hexdigest()[:16]


def _read_chunks(parts: Path) -> list[dict]:
    chunks = []
    for path in sorted(parts.glob("chunk-*.json")):
        with open(path, encoding="utf-8") as f:
            chunks.append(json.load(f))
    return chunks
