"""Benchmark evaluation during and after training, in DeepSeek-R1's protocol (see `r1lightning.evaluation`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from r1lightning.callbacks._common import (barrier, crossed_multiple, gather_objects, log_metrics, needs_lockstep, rank_and_world, write_json,
                                          write_table)
from r1lightning.evaluation import Benchmark, ConsAtK, GreedyAccuracy, PassAt1, PassAtK, evaluate_problems
from r1lightning.options import SamplingOptions, coerce, moved_into

log = logging.getLogger(__name__)


class BenchmarkEval(Callback):
    """Evaluate the live policy on benchmarks: pass@1 averaged over `k` samples, pass@k, cons@k
    (majority vote over the k extracted answers; ties go to the answer seen first in sample order)
    and greedy accuracy. Logged as `bench/<name>/pass@1`, `.../pass@k`, `.../cons@k`,
    `.../greedy`; a JSON report per evaluation goes to `report_dir/step-<global_step>.json`, with
    every problem's samples in `step-<global_step>-<name>.jsonl`.

    Distributed: each rank evaluates every world_size-th problem; the metrics are torchmetrics
    `Metric`s whose sums are reduced over ranks, so every rank logs the global value, and rank 0
    gathers the per-problem records for the report. Generation calls the bare policy (not the
    DDP wrapper), so ranks with more problems than others never wait on a collective. Under FSDP
    generation gathers the shards (a collective): a rank with fewer problems generates throwaway
    batches so that every rank makes the same calls.
    """

    # The flat arguments of earlier versions and where they went.
    moved_arguments = moved_into(SamplingOptions, "sampling", renamed={"k": "num_samples"})

    def __init__(
        self,
        benchmarks: list[Benchmark],
        every_n_steps: int | None = None,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        sampling: SamplingOptions = SamplingOptions(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=512),
        greedy: bool = True,
        batch_size: int = 16,
        seed: int = 0,
        report_dir: str | None = None,
        samples_in_report: int = 3,
    ):
        """
        Args:
            benchmarks: what to evaluate (see `r1lightning.evaluation.Benchmark`).
            every_n_steps: evaluate every N optimizer steps (None: only at start/end).
            at_fit_start: evaluate before the first step (the starting point of the curve).
            at_fit_end: evaluate when training ends.
            sampling: the k = `num_samples` samples per problem for pass@1 / cons@k (R1: 4 to 64
                depending on the test set size; 0 = greedy only), sampled at `temperature` and
                `top_p` (R1: 0.6 and 0.95), within `max_new_tokens` (R1: 32,768; greedy decoding
                too; a benchmark's own `max_new_tokens` wins). `r1lightning.options.SamplingOptions`.
            greedy: also decode greedily once per problem.
            batch_size: problems per generate call (k sequences each).
            seed: sampling seed (each rank adds its rank); the training RNG state is left untouched.
            report_dir: where reports go; default `<trainer.log_dir or default_root_dir>/bench`.
            samples_in_report: completions per benchmark quoted in the JSON report.
        """
        sampling = coerce(SamplingOptions, sampling, "BenchmarkEval.sampling")
        if not benchmarks:
            raise ValueError("BenchmarkEval: give at least one benchmark")
        names = [b.name for b in benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"BenchmarkEval: benchmark names must be distinct, got {names}")
        self.benchmarks = list(benchmarks)
        self.every_n_steps = every_n_steps
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.sampling = sampling
        self.greedy = greedy
        self.batch_size = batch_size
        self.seed = seed
        self.report_dir = report_dir
        self.samples_in_report = samples_in_report
        self.sampler = None  # tests may inject a Sampler
        self.results: list[dict] = []  # every evaluation's metrics, in order
        self._data: dict = {}
        self._last_step = 0
        self._evaluated_at: int | None = None

    # -- triggers ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if self.at_fit_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps and crossed_multiple(self._last_step, step, self.every_n_steps)
        self._last_step = step
        if due:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and self._evaluated_at != trainer.global_step:
            self.evaluate(trainer, pl_module)

    # -- evaluation --------------------------------------------------------------------------
    def _load(self, trainer, benchmark: Benchmark):
        if benchmark.name not in self._data:
            self._data[benchmark.name] = benchmark.load(getattr(trainer, "datamodule", None))
        return self._data[benchmark.name]

    def _report_dir(self, trainer) -> Path:
        if self.report_dir:
            return Path(self.report_dir)
        root = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", ".")
        return Path(root) / "bench"

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Run every benchmark; returns the (rank-synchronised) metrics."""
        rank, world = rank_and_world(trainer)
        step = int(getattr(trainer, "global_step", 0))
        device = getattr(pl_module, "device", torch.device("cpu"))
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        o = self.sampling
        report = {"step": step, "k": o.num_samples, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k,
                  "max_new_tokens": o.max_new_tokens, "world_size": world, "benchmarks": {}}  # fmt: skip
        per_problem: dict[str, list] = {}
        for bench in self.benchmarks:
            data = self._load(trainer, bench)
            mine = list(range(rank, len(data.rows), world))
            # The training RNG must not depend on whether (or how often) evaluation ran.
            fork_devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(self.seed + 1_000_003 * rank)
                sampling = dataclasses.replace(o, max_new_tokens=bench.max_new_tokens) if bench.max_new_tokens else o
                records = evaluate_problems(
                    pl_module, data, mine, sampling=sampling, greedy=self.greedy, batch_size=self.batch_size, sampler=self.sampler,
                    min_batches=_ceil_div(_ceil_div(len(data.rows), world), self.batch_size) if needs_lockstep(trainer) else 0,
                )
            values = self._compute(records, device)
            metrics.update({f"bench/{bench.name}/{key}": v for key, v in values.items()})
            report["benchmarks"][bench.name] = {"problems": len(data.rows), "kind": data.kind, **values}
            gathered = gather_objects(records)
            if rank == 0:
                per_problem[bench.name] = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        report["seconds"] = time.perf_counter() - t0
        if rank == 0:
            self._write_report(trainer, step, report, per_problem)
            log.info("benchmarks at step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        log_metrics(trainer, metrics)
        self.results.append({"step": step, **metrics})
        self._evaluated_at = step
        barrier(trainer, "benchmark_eval")
        return metrics

    def _compute(self, records: list[dict], device) -> dict[str, float]:
        # Every rank reaches compute() for every metric, even with no problems, so the sums reduce.
        out: dict[str, float] = {}
        k = self.sampling.num_samples
        if k > 0:
            correct = torch.tensor([r["correct"] for r in records], dtype=torch.float64).reshape(-1, k)
            cons = torch.tensor([r["cons"] for r in records], dtype=torch.float64)
            for name, metric, value in (("pass@1", PassAt1(), correct), (f"pass@{k}", PassAtK(), correct),
                                        (f"cons@{k}", ConsAtK(), cons)):  # fmt: skip
                metric = metric.to(device)
                metric.update(value)
                out[name] = float(metric.compute())
        if self.greedy:
            metric = GreedyAccuracy().to(device)
            metric.update(torch.tensor([r["greedy"] for r in records], dtype=torch.float64))
            out["greedy"] = float(metric.compute())
        return out

    def _write_report(self, trainer, step: int, report: dict, per_problem: dict[str, list]) -> None:
        out = self._report_dir(trainer)
        for name, records in per_problem.items():
            report["benchmarks"][name]["samples"] = [
                {"id": r["id"], "answer": r["answer"], "correct": r["correct"], "vote": r["vote"],
                 "completions": r["completions"][:2], "greedy_completion": r["greedy_completion"]}
                for r in records[: self.samples_in_report]
            ]  # fmt: skip
            write_table(out / f"step-{step:06d}-{name}.jsonl", records)
        write_json(out / f"step-{step:06d}.json", report)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
