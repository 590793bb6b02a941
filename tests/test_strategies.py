"""Strategies: DDP and FSDP2 (2 CPU processes, gloo) follow the single-device loss trajectory on the
same global batches, for SFT and GRPO; non-finite steps are skipped; the resumable loader.

Making the runs comparable:
- Same global batches. A multi-process run draws its order from Lightning's DistributedSampler
  (permutation seeded by seed_everything's seed; rank r takes every world-th index), a one-process
  run from a RandomSampler with another permutation. `SameOrder*Data` give the one-process run a
  one-replica DistributedSampler, so global batch k holds the same rows under every strategy.
- Same objective. Per-rank means average to the global mean only when every rank has as many
  tokens as the others, and the MoE load-balancing loss is not a mean over examples: rows of
  equal length, aux loss off.
- Same rollouts. GRPO samples, and each rank samples a different part of the batch (seeds differ
  by rank). `PromptSeededSampler` draws every completion's noise from a generator seeded by the
  prompt's tokens, its index in the group and the step, so a completion does not depend on which
  rank or batch it lands in. It samples at temperature 1 by the Gumbel-max trick, an exact draw
  from softmax(logits), so GRPO's log-probs are the real sampling log-probs; only a logit tie
  within float noise could pick another token.

The multi-process runs are launched with torchrun (`python -m tests.test_strategies <strategy>`),
through the real CLI and the real `configs/strategy/*.yaml` overlays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from r1lightning.callbacks import NonFiniteError
from r1lightning.checkpointing import ResumableLoader
from r1lightning.data import PromptDataModule, TraceDataModule
from r1lightning.options import SamplingOptions
from r1lightning.rollout.base import Rollout, Sampler, completion_mask_from_ids
from r1lightning.seeding import step_seed
from r1lightning.strategies import decoder_layer_names, full_state_dict, is_sharded

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
    router_aux_loss_coef=0.0, max_position_embeddings=256, tie_word_embeddings=True,
)
PAIRS = [(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16 problems, every sum one digit: equal lengths
GLOBAL_BATCH, STEPS = 4, 4  # one epoch


# -- pieces the runs name in YAML ----------------------------------------------------------------
class _SameOrder:
    def train_dataloader(self):
        loader = super().train_dataloader()
        if self.trainer is None or self.trainer.world_size > 1:
            return loader  # Lightning puts in its DistributedSampler
        sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                          generator=loader.generator, drop_last=loader.drop_last)


class SameOrderTraceData(_SameOrder, TraceDataModule):
    pass


class SameOrderPromptData(_SameOrder, PromptDataModule):
    pass


def toy_reward(prompts, completions, **kwargs):
    """Varies from completion to completion, so advantages and updates are not zero."""
    return [sum(map(ord, c)) % 7 / 6 for c in completions]


class PromptSeededSampler(Sampler):
    def __init__(self, group_size: int = 4):
        self.group_size = group_size
        self.calls = 0

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id) -> Rollout:
        self.calls += 1
        gens = [torch.Generator().manual_seed(step_seed(self.calls, i % self.group_size, *ids[m.bool()].tolist()))
                for i, (ids, m) in enumerate(zip(prompt_ids, prompt_mask))]
        ids, mask, tokens, logps = prompt_ids, prompt_mask, [], []
        was_training = model.training
        model.eval()
        for _ in range(params.max_new_tokens):  # always the full length: no rank finishes early
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
            logits = logits / params.temperature
            u = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in gens]).clamp(1e-12, 1 - 1e-12)
            tok = (logits.double() - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max: a draw from softmax(logits)
            logps.append(torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
            tokens.append(tok)
            ids = torch.cat([ids, tok[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(tok)[:, None]], 1)
        model.train(was_training)
        completion = torch.stack(tokens, 1)
        cmask, truncated = completion_mask_from_ids(completion, eos_token_id)
        return Rollout(prompt_ids, prompt_mask, completion.masked_fill(cmask == 0, pad_token_id), cmask, truncated,
                       torch.stack(logps, 1) * cmask)


class Recorder(L.Callback):
    """Per step: the named metrics averaged over ranks (the global batch's values); at the end, a
    fingerprint of the gathered weights. Rank 0 writes JSON."""

    def __init__(self, path: str, keys: list[str]):
        self.path, self.keys, self.steps = path, keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        values = torch.tensor([float(trainer.callback_metrics[k]) for k in self.keys], dtype=torch.float64)
        values = trainer.strategy.reduce(values, reduce_op="mean")
        self.steps.append(values.tolist())

    def on_train_end(self, trainer, pl_module):
        state = full_state_dict(pl_module.model)  # every rank (a collective under FSDP)
        state = state if state is not None else pl_module.model.state_dict()
        if trainer.is_global_zero:
            weights = {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in state.items()}
            Path(self.path).write_text(json.dumps({"keys": self.keys, "steps": self.steps, "weights": weights, "world_size": trainer.world_size,
                                                   "strategy": type(trainer.strategy).__name__, "sharded": is_sharded(pl_module.model)}))


# -- the runs ------------------------------------------------------------------------------------
def write_data(directory: Path) -> tuple[Path, Path]:
    traces, prompts = directory / "traces.jsonl", directory / "prompts.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "completion": f"<think>{a}+{b}={a + b}</think><answer>{a + b}</answer>"}) + "\n" for a, b in PAIRS))
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n" for a, b in PAIRS))
    return traces, prompts


def recipe(kind: str, data_file: Path, workdir: Path, name: str, per_rank_batch: int) -> dict:
    # One checkpoint at the end (a directory of shards under FSDP) and the end-of-fit export.
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(workdir / f"ckpt-{name}"), "filename": "final", "every_n_train_steps": STEPS}}
    trainer = {"accelerator": "cpu", "max_steps": STEPS, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
               "callbacks": [{"class_path": "tests.test_strategies.Recorder", "init_args": {"path": str(workdir / f"{name}.out.json"), "keys": []}},
                             checkpoint]}
    policy = {"class_path": "r1lightning.Policy", "init_args": {"config": TINY, "tokenizer": "char", "moe_backend": "eager"}}
    common = {"policy": policy, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}},
              "lr_schedule": "constant", "export_dir": str(workdir / f"export-{name}")}
    if kind == "sft":
        trainer["callbacks"][0]["init_args"]["keys"] = ["train/loss"]
        model = {"class_path": "r1lightning.sft.SFTModule", "init_args": common}
        data = {"class_path": "tests.test_strategies.SameOrderTraceData", "init_args": {"train_files": str(data_file), "batch_size": per_rank_batch}}
    else:
        # Not the token-weighted metrics (kl, entropy): their per-rank means weigh ranks by tokens.
        trainer["callbacks"][0]["init_args"]["keys"] = ["train/loss", "train/reward", "train/grad_norm"]
        model = {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            **common,
            "rewards": [{"fn": "tests.test_strategies.toy_reward", "weight": 1.0}],
            "sampler": {"class_path": "tests.test_strategies.PromptSeededSampler", "init_args": {"group_size": 4}},
            "sampling": {"num_samples": 4, "max_new_tokens": 6}, "micro_batch_size": 64, "loss": {"beta": 0.04}, "log_completions_every": 0}}
        data = {"class_path": "tests.test_strategies.SameOrderPromptData", "init_args": {"train_files": str(data_file), "batch_size": per_rank_batch}}
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def run(strategy: str, workdir: Path) -> None:
    """Runs SFT then GRPO in this process (one rank of a torchrun launch, or alone)."""
    from r1lightning.cli import R1CLI

    world = int(os.environ.get("WORLD_SIZE", 1))
    traces, prompts = write_data(workdir) if int(os.environ.get("RANK", 0)) == 0 else (workdir / "traces.jsonl", workdir / "prompts.jsonl")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()  # the data files exist
    for kind, data_file in (("sft", traces), ("grpo", prompts)):
        cfg = workdir / f"{kind}-{strategy}.json"
        cfg.write_text(json.dumps(recipe(kind, data_file, workdir, f"{kind}-{strategy}", GLOBAL_BATCH // world)))
        R1CLI(args=["fit", "-c", str(cfg), "-c", str(ROOT / f"configs/strategy/{strategy}.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", str(world), "--trainer.precision", "32-true"])


def launch(strategy: str, workdir: Path, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.test_strategies", strategy, str(workdir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tests.test_strategies", strategy, str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    runs = {kind: json.loads((workdir / f"{kind}-{strategy}.out.json").read_text()) for kind in ("sft", "grpo")}
    for kind, run in runs.items():
        run.update(dir=str(workdir), name=f"{kind}-{strategy}")
    return runs


# -- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch("single_device", tmp_path_factory.mktemp("single"), 1)


def assert_same_run(got: dict, want: dict) -> None:
    assert len(got["steps"]) == len(want["steps"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["steps"]), torch.tensor(want["steps"]), rtol=1e-4, atol=1e-6)
    assert got["weights"].keys() == want["weights"].keys()
    torch.testing.assert_close(torch.tensor(list(got["weights"].values())), torch.tensor(list(want["weights"].values())), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_device_trajectory(strategy, single, tmp_path):
    runs = launch(strategy, tmp_path, 2)
    for kind in ("sft", "grpo"):
        got, want = runs[kind], single[kind]
        assert (got["world_size"], want["world_size"]) == (2, 1)
        assert got["strategy"] == {"ddp": "DDPStrategy", "fsdp": "FSDP2Strategy"}[strategy]
        assert got["sharded"] == (strategy == "fsdp")
        assert_same_run(got, want)
        assert_exports_hold_the_trained_weights(got, sharded=strategy == "fsdp")
    # The runs learn: SFT loss falls from ~ln(vocab) over 4 steps; GRPO sees varied rewards.
    sft = [s[0] for s in single["sft"]["steps"]]
    assert sft[0] > 4.5 and sft[-1] < sft[0] - 0.8
    assert all(s[2] > 0 for s in single["grpo"]["steps"])  # non-zero gradient norms every step


def assert_exports_hold_the_trained_weights(run: dict, sharded: bool) -> None:
    """The end-of-fit export (gathered from the shards under FSDP) and `r1lightning export` of the
    final checkpoint (a sharded directory under FSDP, consolidated) both hold the trained weights."""
    from transformers import AutoModelForCausalLM

    from r1lightning.export import export_checkpoint

    work = Path(run["dir"])
    ckpt = work / f"ckpt-{run['name']}" / "final.ckpt"
    assert ckpt.is_dir() == sharded and (ckpt / "meta.pt").exists() == sharded
    fit_end = AutoModelForCausalLM.from_pretrained(work / f"export-{run['name']}")
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckpt, work / f"from-ckpt-{run['name']}"))
    for model in (fit_end, exported):
        state = model.state_dict()
        got = {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in state.items()}
        assert got == {k: run["weights"][k] for k in got}  # bit-identical sums of the recorded weights
        assert len(got) == len(run["weights"])


def test_decoder_layers_come_from_no_split_modules(tiny_moe_config):
    from r1lightning.policy import Policy

    model, _ = Policy(config=tiny_moe_config, tokenizer="char").build()
    assert decoder_layer_names(model) == {"Qwen3MoeDecoderLayer"}
    assert decoder_layer_names(model, ["Qwen3MoeDecoderLayer", "NoSuchLayer"]) == {"Qwen3MoeDecoderLayer"}
    with pytest.raises(ValueError, match="layer_classes"):
        decoder_layer_names(model, ["NoSuchLayer"])


# -- resumable data position ---------------------------------------------------------------------
def _loader(seed=3):
    return DataLoader(list(range(10)), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _epochs(loader, n):
    return [[b.tolist() for b in loader] for _ in range(n)]


def _train(loader: ResumableLoader, batches: int | None = None) -> list:
    """Iterate as the fit loop does, recording progress as ExactResume does after each batch."""
    out = []
    for b in loader:
        if len(out) == batches:
            break
        out.append(b.tolist())
        loader.consumed += 1
    return out


@pytest.mark.parametrize("stop", [2, 5])  # mid-epoch, end of epoch
def test_resumable_loader_continues_where_it_stopped(stop):
    epochs = _epochs(_loader(), 3)
    assert epochs[0] != epochs[1]  # each epoch reshuffles from the same generator

    run = ResumableLoader(_loader())
    assert _train(run) == epochs[0]
    assert _train(run, stop) == epochs[1][:stop]
    state = run.state_dict()

    resumed = ResumableLoader(_loader())  # a new process: fresh generator
    resumed.load_state_dict(state)
    if stop < 5:
        assert _train(resumed) == epochs[1][stop:]
    # A checkpoint at the end of an epoch resumes with the next one (Lightning opens it as such).
    assert _train(resumed) == epochs[2]


def test_resumable_loader_replays_a_pass_that_trained_nothing():
    epochs = _epochs(_loader(), 2)
    run = ResumableLoader(_loader())
    _train(run)
    next(iter(run))  # opened and prefetched, then dropped: no batch trained
    run.consumed = 0
    assert _train(run) == epochs[1]


def test_step_seeds_differ_by_rank_and_step():
    seeds = {step_seed(0, 0, b, r) for b in range(50) for r in range(4)}
    assert len(seeds) == 200 and step_seed(0, 0, 1, 0) == step_seed(0, 0, 1, 0)


# -- non-finite steps ----------------------------------------------------------------------------
class Poison(L.Callback):
    """NaN in one gradient after backward at the given optimizer steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.model.get_input_embeddings().weight.grad[0, 0] = float("nan")


class Snapshots(L.Callback):
    def __init__(self):
        self.changed, self.skipped = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.model.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.model.parameters())))
        self.skipped.append(float(trainer.callback_metrics["train/nonfinite_skipped"]))


def _fit(kind, tmp_path, poison, max_steps=4, **module_args):
    from r1lightning.grpo import GRPOModule
    from r1lightning.policy import Policy
    from r1lightning.rewards import Reward
    from r1lightning.sft import SFTModule

    traces, prompts = write_data(tmp_path)
    L.seed_everything(0)
    policy = Policy(config=TINY, tokenizer="char", moe_backend="eager")
    if kind == "sft":
        module, data = SFTModule(policy, lr_schedule="constant", **module_args), TraceDataModule(train_files=str(traces), batch_size=4)
    else:
        module = GRPOModule(policy, rewards=[Reward("tests.test_strategies.toy_reward")], sampling=SamplingOptions(num_samples=4, max_new_tokens=4),
                            lr_schedule="constant", log_completions_every=0, **module_args)
        data = PromptDataModule(train_files=str(prompts), batch_size=2)
    snaps = Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Poison(poison), snaps])
    return trainer, module, data, snaps


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_nonfinite_gradient_skips_the_step(kind, tmp_path):
    trainer, module, data, snaps = _fit(kind, tmp_path, poison=[1])
    trainer.fit(module, data)
    assert trainer.global_step == 4
    assert snaps.changed == [True, False, True, True]  # step 1 left every parameter as it was
    assert snaps.skipped == [0.0, 1.0, 1.0, 1.0]
    state = trainer.optimizers[0].state[module.model.get_input_embeddings().weight]
    assert int(state["step"]) == 3  # AdamW's moments saw three updates, not four
    assert torch.isfinite(module.model.get_input_embeddings().weight).all()


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(kind, tmp_path):
    trainer, module, data, snaps = _fit(kind, tmp_path, poison=[1, 2], max_steps=6, max_nonfinite_in_a_row=2)
    with pytest.raises(NonFiniteError, match=r"stopping at step 2: 2 optimizer steps in a row .*max_nonfinite_in_a_row=2"):
        trainer.fit(module, data)
    assert snaps.changed == [True, False]  # the second bad step was skipped too before stopping


def test_a_guard_listed_in_the_trainer_keeps_its_settings(tmp_path):
    from r1lightning.callbacks import ExactResume, NonFiniteGuard

    trainer, module, data, snaps = _fit("sft", tmp_path, poison=[1, 2], max_steps=6, max_nonfinite_in_a_row=2)
    mine = NonFiniteGuard(max_in_a_row=5)
    trainer.callbacks.insert(0, mine)  # as `trainer.callbacks` in a YAML puts it
    trainer.fit(module, data)  # two bad steps in a row: the module's default (2) would have stopped here
    assert trainer.global_step == 6
    guards = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert guards == [mine]
    assert sum(isinstance(c, ExactResume) for c in trainer.callbacks) == 1  # the default still came in
    assert snaps.skipped[-1] == 2.0


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))


@pytest.mark.slow
def test_the_16k_fsdp_recipe_runs_on_two_cpu_processes(tmp_path):
    """configs/gpu/long16k_fsdp.yaml (issue 13's 16k point) composed with fsdp.yaml, shrunk to a tiny
    OLMoE and 64 tokens: two gloo processes, the paged engine sampling from the gathered policy, two
    steps with every completion at the forced length."""
    import csv

    tiny = ('{"model_type": "olmoe", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,'
            ' "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,'
            ' "max_position_embeddings": 512, "router_aux_loss_coef": 0.0}')
    cmd = [sys.executable, "-m", "r1lightning", "fit", "-c", "configs/gpu/long16k_fsdp.yaml", "-c", "configs/strategy/fsdp.yaml",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "bf16-true",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--model.init_args.policy.init_args.config", tiny, "--model.init_args.sampler.init_args.min_new_tokens", "64",
           "--model.init_args.sampling.max_new_tokens", "64", "--data.init_args.data_dir", str(tmp_path / "data")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (log,) = tmp_path.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(log.open()) if r.get("train/completions/mean_length")]
    assert len(rows) == 2
    assert all(float(r["train/completions/mean_length"]) == 64 for r in rows)
    assert all(float(r["train/time/rollout"]) > 0 and float(r["train/time/train"]) > 0 for r in rows)
