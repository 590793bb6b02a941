"""Kill test: a quickstart-like GRPO run killed with SIGKILL twice (mid-epoch, then at the end of an
epoch) and resumed each time with `--ckpt_path last` logs, step for step, the metrics of the same
run left alone: rewards, loss, KL, gradient norm, lr, completion lengths, validation accuracy.

The run samples with transformers' `generate` (global RNG), crosses epoch boundaries of a shuffled
loader and validates in between, so the RNG, the data position and the optimizer/scheduler/reference
state all have to come back for the numbers to agree. Each kill lands while the run waits at the start
of the batch after a checkpoint (`PauseAt`), so where it stops is known; the checkpoint write itself
is atomic (`AtomicCheckpointIO`).

    python -m pytest tests/test_resume.py -q             # the kill test (~35 s) and atomic writes
    python -m pytest tests/test_resume.py -q -m slow     # FSDP2, 2 processes: sharded checkpoint resume
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
    router_aux_loss_coef=0.01, max_position_embeddings=256, tie_word_embeddings=True,
)
MAX_STEPS = 8  # 3 batches an epoch: checkpoints at 2 (mid-epoch), 4, 6 (end of epoch 2), 8
TIMING = ("time/", "tokens_per_s", "step_time")


class PauseAt(L.Callback):
    """Test hook: with R1L_PAUSE_AT=N, announce in R1L_PAUSE_FILE and wait before training step N+1
    (until R1L_GO_FILE exists, if set)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        at = os.environ.get("R1L_PAUSE_AT")
        if at and trainer.global_step == int(at):
            Path(os.environ["R1L_PAUSE_FILE"]).write_text(at)
            go = os.environ.get("R1L_GO_FILE")
            deadline = time.time() + 600
            while time.time() < deadline and not (go and Path(go).exists()):
                time.sleep(0.05)


def config(run: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "val_check_interval": 3, "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 1, "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(run),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(run), "name": "logs", "flush_logs_every_n_steps": 1}}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "every_n_train_steps": 2, "save_top_k": -1}},
                {"class_path": "tests.test_resume.PauseAt"},
            ],
        },
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": TINY, "tokenizer": "char", "moe_backend": "eager"}},
            "rewards": [{"fn": "accuracy", "weight": 1.0}, {"fn": "format", "weight": 0.1},
                        {"fn": "tests.test_strategies.toy_reward", "weight": 1.0}],  # varied rewards: real updates
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0}},
            "sampling": {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0}, "loss": {"beta": 0.04, "epsilon_high": 0.28},
            "micro_batch_size": 64, "warmup_steps": 2, "lr_schedule": "cosine", "val_max_new_tokens": 8,
            "log_completions_every": 0}},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {
            "task": {"class_path": "r1lightning.tasks.AdditionTask", "init_args": {"digits": 1, "seed": 0, "num_train": 6, "num_test": 4}},
            "data_dir": str(run / "data"), "batch_size": 2, "val_batch_size": 4, "max_length": 64}},
    }


def start(run: Path, *extra: str, pause_at: int | None = None, go_file: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               R1L_PAUSE_FILE=str(run / "paused"))
    env.pop("R1L_PAUSE_AT", None)
    env.pop("R1L_GO_FILE", None)
    if go_file is not None:
        env["R1L_GO_FILE"] = str(go_file)
    if pause_at is not None:
        env["R1L_PAUSE_AT"] = str(pause_at)
    cfg = run / "config.json"
    cfg.write_text(json.dumps(config(run)))
    log = open(run / f"log-{len(list(run.glob('log-*')))}.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "r1lightning", "fit", "-c", str(cfg), *extra], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_paused(proc: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    flag = run / "paused"
    deadline = time.time() + timeout
    while not flag.exists():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before pausing: {sorted(run.glob('log-*'))[-1].read_text()[-3000:]}"
        assert time.time() < deadline, "run did not reach the pause"
        time.sleep(0.05)
    flag.unlink()


def kill_when_paused(proc: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    wait_paused(proc, run, timeout)
    proc.kill()  # SIGKILL: no handler, no clean-up
    proc.wait()


def finish(proc: subprocess.Popen, run: Path) -> None:
    rc = proc.wait(timeout=300)
    assert rc == 0, sorted(run.glob("log-*"))[-1].read_text()[-3000:]


def metrics(run: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value of the run's one logger version; a (step, name) logged twice fails."""
    versions = list((run / "logs").glob("version_*"))
    assert [v.name for v in versions] == ["version_0"], versions  # a resumed run appends to its version
    out = {}
    with open(versions[0] / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None) or any(t in name for t in TIMING):
                    continue
                key = (int(row["step"]), name)
                assert key not in out, f"{key} logged twice"
                out[key] = float(value)
    return out


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    run = tmp_path_factory.mktemp("straight")
    finish(start(run), run)
    return run


def assert_same_metrics(got: dict, want: dict) -> None:
    steps = sorted({s for s, _ in want})
    assert steps[-1] == MAX_STEPS - 1 and len(steps) == MAX_STEPS  # CSVLogger counts steps from 0
    assert got.keys() == want.keys()
    mismatched = [(k, got[k], want[k]) for k in sorted(want) if not math.isclose(got[k], want[k], rel_tol=0, abs_tol=0)]
    assert not mismatched, mismatched[:10]


def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path, straight):
    killed = tmp_path / "killed"
    killed.mkdir()

    kill_when_paused(start(killed, pause_at=2), killed)  # mid-epoch 0
    assert checkpoint_step(killed / "checkpoints/last.ckpt") == 2
    kill_when_paused(start(killed, "--ckpt_path", "last", pause_at=6), killed)  # epoch 1 just ended
    assert checkpoint_step(killed / "checkpoints/last.ckpt") == 6
    finish(start(killed, "--ckpt_path", "last"), killed)

    want, got = metrics(straight), metrics(killed)
    steps = sorted({s for s, _ in want})
    assert steps[-1] == MAX_STEPS - 1 and len(steps) == MAX_STEPS  # CSVLogger counts steps from 0
    assert got.keys() == want.keys()
    names = {n for _, n in want}
    for key in ("train/reward", "train/loss", "train/kl", "train/grad_norm", "train/lr", "train/completions/mean_length",
                "train/nonfinite_skipped", "val/accuracy"):
        assert key in names, key
    mismatched = [(k, got[k], want[k]) for k in sorted(want) if not math.isclose(got[k], want[k], rel_tol=0, abs_tol=0)]
    assert not mismatched, mismatched[:10]
    # The run is not trivially constant: rewards and losses move from step to step.
    assert len({want[(s, "train/reward")] for s in steps}) > 3 and len({want[(s, "train/loss")] for s in steps}) > 3


def test_ctrl_c_before_the_first_checkpoint_saves_the_step_and_resumes_it(tmp_path, straight):
    """SIGINT while step 1 is about to run (checkpoints are scheduled every 2 steps): step 1 finishes,
    is saved, the run exits; `--ckpt_path last` continues from step 1 and ends as the straight run."""
    run = tmp_path / "interrupted"
    run.mkdir()
    go = run / "go"
    proc = start(run, pause_at=0, go_file=go)
    wait_paused(proc, run)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # delivered while the step waits
    go.write_text("")
    assert proc.wait(timeout=300) == 1  # Lightning's exit status after an interrupt
    log = sorted(run.glob("log-*"))[-1].read_text()
    assert "SIGINT: step 1 saved to" in log, log[-3000:]
    assert checkpoint_step(run / "checkpoints/last.ckpt") == 1
    assert not list((run / "checkpoints").glob("epoch=*"))  # no scheduled checkpoint was reached

    resumed = start(run, "--ckpt_path", "last")
    finish(resumed, run)
    log = sorted(run.glob("log-*"))[-1].read_text()
    assert "Restoring states from the checkpoint path" in log, log[-3000:]
    assert_same_metrics(metrics(run), metrics(straight))


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_kill_and_slurm_warning_save_the_step_like_ctrl_c(tmp_path, name):
    """`kill` (SIGTERM) and SLURM's pre-emption warning (SIGUSR1) take Ctrl-C's path: the step finishes,
    `last.ckpt` holds it, the run exits with status 1 (the resume from there is the test above)."""
    run = tmp_path / name
    run.mkdir()
    go = run / "go"
    proc = start(run, pause_at=0, go_file=go)
    wait_paused(proc, run)
    proc.send_signal(getattr(signal, name))
    time.sleep(0.5)
    go.write_text("")
    assert proc.wait(timeout=300) == 1
    log = sorted(run.glob("log-*"))[-1].read_text()
    assert f"{name}: step 1 saved to" in log, log[-3000:]
    assert checkpoint_step(run / "checkpoints/last.ckpt") == 1


def test_checkpoint_writes_are_atomic(tmp_path):
    from r1lightning.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"global_step": 4, "bad": lambda: None}, path)  # fails halfway through pickling
    assert torch.load(path, weights_only=True)["global_step"] == 2  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# -- FSDP2: sharded checkpoints resume the same way ----------------------------------------------
def fsdp_run(workdir: Path, ckpt: str | None) -> None:
    """One rank of a 2-process FSDP2 GRPO run (torchrun), from scratch or from `ckpt`."""
    from r1lightning.cli import R1CLI
    from tests.test_strategies import recipe

    name = "resumed" if ckpt else "straight"
    cfg = recipe("grpo", workdir / "prompts.jsonl", workdir, name, per_rank_batch=1)
    cfg["trainer"]["max_steps"] = 6  # 8 prompts over 2 ranks, 1 each: 4 batches an epoch
    cfg["trainer"]["callbacks"][1]["init_args"].update(every_n_train_steps=3, save_top_k=-1, filename="{step}")
    cfg["data"]["class_path"] = "r1lightning.data.PromptDataModule"  # shuffled by Lightning's sampler
    cfg["model"]["init_args"]["sampler"] = None  # transformers' generate, global RNG: seeds must be restored
    (workdir / f"{name}.json").write_text(json.dumps(cfg))
    args = ["fit", "-c", str(workdir / f"{name}.json"), "-c", str(ROOT / "configs/strategy/fsdp.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
    R1CLI(args=args + (["--ckpt_path", ckpt] if ckpt else []))


@pytest.mark.slow  # ~40 s: two 2-process runs; `python -m pytest -m slow tests/test_resume.py`
def test_fsdp_sharded_checkpoint_resumes_exactly(tmp_path):
    from tests.test_strategies import PAIRS

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
                                                    for a, b in PAIRS[:8]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.test_resume",
               "fsdp", str(tmp_path), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]

    launch()
    ckpt = tmp_path / "ckpt-straight" / "step=3.ckpt"  # mid-epoch
    assert ckpt.is_dir() and (ckpt / "meta.pt").exists()
    launch(str(ckpt))
    straight = json.loads((tmp_path / "straight.out.json").read_text())
    resumed = json.loads((tmp_path / "resumed.out.json").read_text())
    assert len(straight["steps"]) == 6 and len(resumed["steps"]) == 3
    assert resumed["steps"] == straight["steps"][3:]  # loss, reward, grad norm: bit for bit
    assert resumed["weights"] == straight["weights"]


if __name__ == "__main__":
    fsdp_run(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
