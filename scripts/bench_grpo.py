"""One GRPO step on an OLMoE-1B-7B-shaped policy (random init): this project's `GRPOModule` with the
static-cache engine, driven by a Lightning Trainer, vs TRL's `GRPOTrainer` (no vLLM) on the same
model, data and settings. Prints seconds per step split into rollout / reference / policy update.

    python3 scripts/bench_grpo.py                                   # ours, H200 defaults
    python3 scripts/bench_grpo.py --frameworks ours trl trl_megablocks   # needs trl==1.16.0
    python3 scripts/bench_grpo.py --layers 2 --hidden 128 --experts 8 --vocab 512 --prompts 2 \
        --prompt-len 16 --new-tokens 8 --steps 2 --device cpu           # a smoke run

Settings (both frameworks): G = 8 completions per prompt, 16 prompts of 128 tokens, 256 completion
tokens with EOS suppressed (equal lengths), temperature 1, mu = 1, beta = 0.04 (k3 KL to a frozen
reference), gradient checkpointing, bf16 weights, AdamW, one optimizer step per generation batch.
Prompts are random token ids written as words of a synthetic word-level tokenizer (one token per word),
and the reward is the fraction of even token ids in the completion (cheap and varied).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import add_model_args, build_model, sync  # noqa: E402


def parity_reward(prompts=None, completions=None, **kwargs):
    out = []
    for c in completions:
        c = c if isinstance(c, str) else str(c)
        words = [w for w in c.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


def make_tokenizer(vocab: int, directory: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    words.update({f"t{i}": i for i in range(4, vocab)})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    tok.save_pretrained(directory)
    return tok


def prompts(args):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.prompts * args.steps, args.prompt_len), generator=g)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def build(args, device, megablocks: bool):
    from r1lightning.moe import apply_moe_backend

    torch.manual_seed(0)
    model = build_model(args, device).requires_grad_(True)
    backend = apply_moe_backend(model, "megablocks" if megablocks else "grouped_mm")
    model.config.router_aux_loss_coef = 0.0  # TRL adds no load-balancing loss unless asked; neither do we
    return model, backend


# -- ours ------------------------------------------------------------------------------------------
def run_ours(args, device, tok, tokdir, texts, megablocks):
    import lightning as L

    from r1lightning.grpo import GRPOModule
    from r1lightning.policy import Policy
    from r1lightning.rewards import Reward, register_reward
    from r1lightning.rollout import StaticCacheSampler

    register_reward("bench_parity")(parity_reward)  # a second registration of the same function is a no-op
    model, backend = build(args, device, megablocks)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler = StaticCacheSampler(min_new_tokens=args.new_tokens, kv_bucket=64, keep_cache=not args.free_cache,
                                 compile=args.compile)
    module = GRPOModule(
        Policy(config={"model_type": "olmoe"}, tokenizer=tokdir), rewards=[Reward("bench_parity")],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=device == "cuda"),
        sampler=sampler, num_generations=args.G, max_new_tokens=args.new_tokens, temperature=1.0, num_iterations=1,
        micro_batch_size=args.micro_batch, beta=args.beta, router_aux_loss_coef=0.0, lr_schedule="constant",
        log_completions_every=0,
    )
    module.model = model  # built here (on the GPU, bf16), not by Policy.build
    module.is_moe, module.aux_coef = True, 0.0

    enc = tok(texts, return_tensors="pt", padding=True)
    batches = [{"prompt_ids": enc["input_ids"][i : i + args.prompts], "prompt_mask": enc["attention_mask"][i : i + args.prompts],
                "columns": {}} for i in range(0, len(texts), args.prompts)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    rec = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            m = trainer.callback_metrics
            rec.append({"step_s": time.perf_counter() - self.t0, "rollout_s": float(m["train/time/rollout"]),
                        "reference_s": float(m["train/time/reference"]), "update_s": float(m["train/time/train"]),
                        "completion_tokens": float(m["train/completions/mean_length"]) * args.prompts * args.G,
                        "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
                        "rollout_decode_s": sampler.last_stats.get("decode_s")})
            print(json.dumps({"framework": "ours", "step": batch_idx, **rec[-1]}), flush=True)

    sampler.timing = True
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-true", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(module, train_dataloaders=loader)
    del trainer, module, model
    return {"backend": backend, "steps": rec}


# -- TRL -------------------------------------------------------------------------------------------
def run_trl(args, device, tok, tokdir, texts, megablocks):
    import datasets
    import trl
    from transformers import TrainerCallback

    from r1lightning.moe import apply_moe_backend

    modeldir = os.path.join(args.workdir, "model")
    if not os.path.exists(os.path.join(modeldir, "config.json")):
        model, _ = build(args, device, False)
        model.save_pretrained(modeldir)  # TRL loads policy and reference from a path
        tok.save_pretrained(modeldir)
        del model
        torch.cuda.empty_cache() if device == "cuda" else None
    fields = trl.GRPOConfig.__dataclass_fields__
    micro = min(args.micro_batch, args.prompts * args.G)
    if (args.prompts * args.G) % micro:
        raise ValueError(f"--micro-batch {micro} must divide prompts x G = {args.prompts * args.G}")
    want = dict(
        output_dir=os.path.join(args.workdir, "trl_out"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.prompts * args.G // micro, num_generations=args.G,
        max_completion_length=args.new_tokens, max_prompt_length=args.prompt_len, temperature=1.0, top_p=1.0,
        beta=args.beta, num_iterations=1, use_vllm=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device == "cuda", learning_rate=1e-6,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, max_steps=args.steps, report_to=[], save_strategy="no",
        generation_kwargs={"min_new_tokens": args.new_tokens}, seed=0, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.bfloat16}, use_cpu=device == "cpu", log_completions=False,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", lr_scheduler_type="constant",
        shuffle_dataset=False,
    )
    cfg = trl.GRPOConfig(**{k: v for k, v in want.items() if k in fields})
    ds = datasets.Dataset.from_dict({"prompt": texts})
    trainer = trl.GRPOTrainer(model=modeldir, reward_funcs=[parity_reward], args=cfg, train_dataset=ds,
                              processing_class=tok)
    if megablocks:
        for m in (trainer.model, getattr(trainer, "ref_model", None)):
            if m is not None:
                apply_moe_backend(m, "megablocks")
    timers = {"rollout": 0.0, "reference": 0.0}

    def timed(fn, key_of):
        def wrapper(*a, **kw):
            key = key_of(a, kw)
            if key is None:
                return fn(*a, **kw)
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            timers[key] += time.perf_counter() - t0
            return out
        return wrapper

    policy = trainer.model
    policy.generate = timed(policy.generate, lambda a, kw: "rollout")
    if hasattr(policy, "generate_batch"):
        policy.generate_batch = timed(policy.generate_batch, lambda a, kw: "rollout")
    ref = getattr(trainer, "ref_model", None)
    name = "_get_per_token_logps_and_entropies" if hasattr(trainer, "_get_per_token_logps_and_entropies") else "_get_per_token_logps"
    orig = getattr(trainer, name)
    setattr(trainer, name, timed(orig, lambda a, kw: "reference" if ref is not None and (a[0] if a else kw.get("model")) is ref else None))

    rec = []

    class Timer(TrainerCallback):
        last = None

        def on_step_begin(self, a, state, control, **kw):
            if Timer.last is None:
                sync()
                Timer.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            now = time.perf_counter()
            r = {"step_s": now - Timer.last, "rollout_s": timers["rollout"], "reference_s": timers["reference"]}
            r["update_s"] = r["step_s"] - r["rollout_s"] - r["reference_s"]
            r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            rec.append(r)
            print(json.dumps({"framework": "trl", "step": state.global_step, **r}), flush=True)
            timers["rollout"] = timers["reference"] = 0.0
            Timer.last = now

    trainer.add_callback(Timer())
    trainer.train()
    del trainer
    torch.cuda.empty_cache() if device == "cuda" else None
    return {"backend": "megablocks" if megablocks else "grouped_mm", "trl": trl.__version__, "steps": rec}


def summarize(name, res, args):
    steps = res["steps"][1:] or res["steps"]  # the first step captures graphs / initialises optimizer state
    med = {k: statistics.median(s[k] for s in steps) for k in ("step_s", "rollout_s", "reference_s", "update_s")}
    tokens = args.prompts * args.G * args.new_tokens
    return {"name": name, **med, "completion_tok_s": tokens / med["step_s"], "rollout_tok_s": tokens / med["rollout_s"],
            "first_step_s": res["steps"][0]["step_s"], "peak_GiB": max(s["peak_GiB"] for s in res["steps"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frameworks", nargs="+", default=["ours"],
                    choices=["ours", "ours_megablocks", "trl", "trl_megablocks"])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward (both frameworks)")
    ap.add_argument("--steps", type=int, default=3, help="steps per framework; the first is reported apart")
    ap.add_argument("--free-cache", action="store_true", help="ours: free the KV cache and graphs after each rollout")
    ap.add_argument("--compile", default=None, help="ours: the engine's torch.compile mode for the decode step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_grpo_")
    tokdir = os.path.join(args.workdir, "tokenizer")
    tok = make_tokenizer(args.vocab, tokdir)
    texts = prompts(args)
    out = {"args": vars(args), "torch": torch.__version__, "results": {}}
    for fw in args.frameworks:
        runner = run_ours if fw.startswith("ours") else run_trl
        try:
            res = runner(args, args.device, tok, tokdir, texts, megablocks=fw.endswith("megablocks"))
            out["results"][fw] = {"raw": res, "summary": summarize(fw, res, args)}
            print("# summary", json.dumps(out["results"][fw]["summary"]), flush=True)
        except Exception as err:
            import traceback

            traceback.print_exc()
            print(f"# {fw} failed: {type(err).__name__}: {err}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print()
    print("| framework | s / step | rollout s | reference s | update s | completion tokens/s | rollout tokens/s | first step s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fw, r in out["results"].items():
        s = r["summary"]
        print(f"| {fw} | {s['step_s']:.2f} | {s['rollout_s']:.2f} | {s['reference_s']:.2f} | {s['update_s']:.2f} | "
              f"{s['completion_tok_s']:,.0f} | {s['rollout_tok_s']:,.0f} | {s['first_step_s']:.2f} | {s['peak_GiB']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
