#!/usr/bin/env python3
"""SFT and GRPO under `FSDP2Strategy` (one process) vs the single-device strategy, through the real
Lightning Trainer and modules, on an OLMoE-1B-7B-shaped policy (16 layers, hidden 2048, 64 experts,
top-8, expert FFN 1024, vocab 50304; random init, `moe_backend: megablocks`). Then the FSDP GRPO run's
end-of-fit export of the policy (gathered from the shards) is reloaded in plain transformers and
compared, tensor by tensor and by logits, with the trained weights.

    python3 scripts/bench_fsdp.py --json $OUT/bench_fsdp.json            # H200
    python3 scripts/bench_fsdp.py --tiny --device cpu --json -            # a smoke run on the CPU
    python3 scripts/bench_fsdp.py --devices 2 --runs sft:fsdp grpo:fsdp  # 2 GPUs, one process each

With `--devices N` Lightning's own launcher starts the other N-1 processes (each re-runs this script);
every rank trains on its own batch of the sizes below, so tokens/s is reported per GPU and in total,
and peak memory per GPU.

Both strategies use bf16 weights (`precision: bf16-true`, Adam state in bf16): with fp32 master
weights the 6.9 B parameters need ~111 GB for weights, gradients and Adam before activations, and
GRPO's reference adds 13.8 GB more (docs/benchmarks.md, MoE section), too much for one GPU. Sharding
over several GPUs is what makes `bf16-mixed` (configs/strategy/fsdp.yaml's default) fit.

SFT: batches of 4 x 2048 random tokens (labels = inputs), cross-entropy + router aux loss.
GRPO: 8 prompts x G 4 completions of 64 sampled tokens (transformers `generate`), beta 0.04 (the
reference model is built and sharded too), format reward (zero here: the throughput is the point).
Times are wall-clock per training step with CUDA synchronised at both ends, after warm-up steps.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import sync  # noqa: E402
from olmoe_shape import OLMOE_1B_7B  # noqa: E402

OLMOE = dict(model_type="olmoe", **OLMOE_1B_7B, router_aux_loss_coef=0.01)
TINY = dict(model_type="olmoe", vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=512, router_aux_loss_coef=0.01)
GiB = 2**30


def policy_class():
    from r1lightning.policy import Policy

    class DevicePolicy(Policy):
        """Initialises the random weights on the GPU (minutes on the CPU for 6.9 B parameters)."""

        device = "cpu"

        def build(self, tokenizer=None):
            with torch.device(self.device):
                return super().build(tokenizer)

    return DevicePolicy


def meter_class():
    import lightning as L

    class Meter(L.Callback):
        def __init__(self, warmup: int):
            self.warmup, self.times, self.tokens, self.split = warmup, [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            dt = time.perf_counter() - self.t0
            m = trainer.callback_metrics
            if "input_ids" in batch:
                tokens = int(batch["attention_mask"].sum())
            else:  # GRPO: sampled completion tokens (mean length x completions)
                tokens = float(m["train/completions/mean_length"]) * len(batch["prompt_ids"]) * pl_module.sampling.num_samples
            if batch_idx >= self.warmup:
                self.times.append(dt)
                self.tokens.append(tokens)
                if "train/time/rollout" in m:
                    self.split.append({k: float(m[f"train/time/{k}"]) for k in ("rollout", "reference", "train")})

    return Meter


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def run(kind: str, strategy_name: str, args, export_dir: str | None = None) -> dict:
    import lightning as L

    from r1lightning.data import PromptDataModule
    from r1lightning.grpo import GRPOModule
    from r1lightning.options import GRPOLossOptions, SamplingOptions
    from r1lightning.rewards import Reward
    from r1lightning.sft import SFTModule
    from r1lightning.strategies import FSDP2Strategy

    cfg = TINY if args.tiny else OLMOE
    Policy = policy_class()
    Policy.device = args.device
    policy = Policy(config=dict(cfg), tokenizer="char", moe_backend=args.moe_backend, dtype="bfloat16")
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # noqa: E731
    L.seed_everything(0)
    if kind == "sft":
        module = SFTModule(policy, optimizer=optimizer, lr_schedule="constant", export_dir=export_dir)
        steps = args.sft_warmup + args.sft_steps
        data = torch.utils.data.DataLoader(RandomTokens(steps * args.batch * args.devices, args.seq, cfg["vocab_size"]),
                                           batch_size=args.batch)
        warmup = args.sft_warmup
    else:
        module = GRPOModule(policy, rewards=[Reward("format")], optimizer=optimizer,
                            sampling=SamplingOptions(num_samples=args.group, max_new_tokens=args.new_tokens),
                            micro_batch_size=args.prompts * args.group, loss=GRPOLossOptions(beta=0.04),
                            lr_schedule="constant", log_completions_every=0, export_dir=export_dir)
        steps = args.grpo_warmup + args.grpo_steps
        prompts = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}? Think step by step.", "answer": str(a + b)}) + "\n"
                                   for a in range(100, 100 + steps * args.prompts * args.devices) for b in (7,)))
        data = PromptDataModule(train_files=str(prompts), batch_size=args.prompts, max_length=128)
        warmup = args.grpo_warmup
    meter = meter_class()(warmup)
    accelerator = "cuda" if args.device == "cuda" else "cpu"
    strategy = FSDP2Strategy() if strategy_name == "fsdp" else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=args.devices, strategy=strategy, precision="bf16-true", max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False, callbacks=[meter])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if kind == "sft":
        trainer.fit(module, train_dataloaders=data)
    else:
        trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - t0
    step = statistics.median(meter.times)
    peak = torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None
    world = trainer.world_size
    peaks = [peak]
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    out = {
        "kind": kind, "strategy": strategy_name, "lightning_strategy": type(trainer.strategy).__name__,
        "moe_backend": policy.moe_backend_in_effect, "steps_timed": len(meter.times), "step_s_median": step,
        "step_s_all": meter.times, "tokens_per_step": statistics.median(meter.tokens),
        "tokens_per_s": statistics.median(meter.tokens) / step, "fit_wall_s": wall, "world_size": world,
        "tokens_per_s_total": world * statistics.median(meter.tokens) / step,
        "peak_gib": max(peaks) if None not in peaks else None, "peak_gib_per_rank": peaks,
        "params": sum(p.numel() for p in module.model.parameters()),
    }
    if meter.split:
        out["split_s_median"] = {k: statistics.median(s[k] for s in meter.split) for k in meter.split[0]}
    return out, module


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_export(module, directory: str, device: str) -> dict:
    """The export holds exactly the trained weights and gives the same logits in plain transformers.
    Every rank takes part (gathering the shards and the sharded forward are collectives); rank 0 reports."""
    from transformers import AutoModelForCausalLM

    from r1lightning.strategies import full_state_dict

    trained = full_state_dict(module.model)
    trained = module.model.state_dict() if trained is None else trained
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has finished writing the export
    t0 = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    load_s = time.perf_counter() - t0
    # Same experts implementation on both sides (transformers' default); the trained model ran MegaBlocks.
    impl = getattr(reloaded.config, "_experts_implementation", None) or "grouped_mm"
    module.model.set_experts_implementation(impl)
    # Non-persistent buffers (RoPE frequencies) are rebuilt from the config on load; `bf16-true`
    # had cast the trained model's to bf16. Compare the weights' logits, not that rounding.
    rounded = []
    for name, buf in reloaded.named_buffers():
        mine = module.model.get_buffer(name)
        rounded += [name] if mine.dtype != buf.dtype else []
        mine.data = buf.to(mine.device)
    ids = torch.randint(3, reloaded.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        a = module.model.eval()(input_ids=ids).logits.float()
        b = reloaded(input_ids=ids).logits.float()
    if rank() != 0:
        return {}
    state = reloaded.state_dict()
    same = sorted(k for k in trained if k in state and torch.equal(state[k].cpu(), trained[k].cpu()))
    return {"tensors": len(trained), "tensors_equal": len(same), "missing": sorted(set(trained) - set(state))[:5],
            "logits_equal": bool(torch.equal(a, b)), "logits_max_abs_diff": float((a - b).abs().max()),
            "experts_implementation": impl, "reload_s": load_s, "buffers_cast_by_bf16_true": rounded[:3] + (["..."] if len(rounded) > 3 else []),
            "export_gib": sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / GiB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="-", help="write results here ('-': stdout only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    p.add_argument("--moe-backend", default="megablocks")
    p.add_argument("--runs", nargs="+", default=["sft:single", "sft:fsdp", "grpo:single", "grpo:fsdp"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--sft-warmup", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--grpo-warmup", type=int, default=1)
    p.add_argument("--grpo-steps", type=int, default=2)
    p.add_argument("--export-after", default="grpo:fsdp", help="the run whose end-of-fit export is reloaded and checked ('' = none)")
    p.add_argument("--export-dir", default=os.path.join(tempfile.gettempdir(), "r1l-bench-fsdp-export"),
                   help="shared by all ranks (every rank re-runs this script with the same arguments)")
    p.add_argument("--devices", type=int, default=1, help="GPUs (one process each, Lightning's launcher)")
    args = p.parse_args()
    if args.devices > 1 and any(not spec.endswith(":fsdp") for spec in args.runs):
        p.error("--devices > 1 runs only the FSDP strategy: --runs sft:fsdp grpo:fsdp")
    if args.tiny:
        args.seq = min(args.seq, 64)

    import lightning
    import transformers

    results = {"date": datetime.date.today().isoformat(), "argv": sys.argv[1:], "torch": torch.__version__,
               "transformers": transformers.__version__, "lightning": lightning.__version__,
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "runs": []}

    def save():
        text = json.dumps(results, indent=1)
        if args.json != "-" and rank() == 0:
            Path(args.json).write_text(text)

    for spec in args.runs:
        kind, strategy = spec.split(":")
        export = spec == args.export_after
        export_dir = args.export_dir if export else None
        try:
            res, module = run(kind, strategy, args, export_dir)
            if export:
                res["export"] = check_export(module, export_dir, args.device)
        except Exception as err:  # keep what the other runs measured
            import traceback

            traceback.print_exc()
            res, module = {"kind": kind, "strategy": strategy, "error": f"{type(err).__name__}: {err}"}, None
        results["runs"].append(res)
        save()
        if rank() == 0:
            print(json.dumps({k: v for k, v in res.items() if k != "step_s_all"}), flush=True)
        del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if rank() != 0:
        return
    print("\n| run | strategy | GPUs | step s (median) | tokens/s per GPU | tokens/s total | peak GiB per GPU |\n|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['kind']} | {r['strategy']} | | error: {r['error'][:80]} | | | |")
        else:
            peak = " / ".join(f"{g:.1f}" for g in r["peak_gib_per_rank"]) if r["peak_gib"] is not None else "-"
            print(f"| {r['kind']} | {r['strategy']} | {r['world_size']} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s_total']:.0f} | {peak} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
