"""GRPO steps on an OLMoE-1B-7B-shaped policy (random init): this project's `GRPOModule` with the
paged engine (`--engine static`: the static-cache one), driven by a Lightning Trainer, vs TRL's `GRPOTrainer` (no vLLM) on the same
model, data and settings. Prints seconds per step split into rollout / reference / policy update.

    python3 scripts/bench_grpo.py                                   # ours, 256 tokens, H200 defaults
    python3 scripts/bench_grpo.py --frameworks ours trl trl_megablocks   # needs trl==1.16.0
    python3 scripts/bench_grpo.py --frameworks ours_megablocks ours_megablocks_liger trl_megablocks \
        --lengths 256 1024 4096 8192 --length-dist fixed lognormal  # the length sweep (one process per framework is fine too)
    python3 scripts/bench_grpo.py --layers 2 --hidden 128 --experts 8 --vocab 512 --prompts 2 \
        --prompt-len 16 --lengths 8 16 --reps 2 --device cpu --length-dist fixed lognormal   # a smoke run

Settings (every framework, asserted equal): G = 8 completions per prompt, 16 prompts of 128 tokens,
temperature 1, top-p 1, mu = 1, beta = 0.04 (k3 KL to a frozen reference), bf16 weights, AdamW
(lr 1e-6, no weight decay), grad-norm clip 1, one optimizer step per generation batch, gradient
checkpointing. Ours runs its DEFAULT update configuration (token-budget micro-batches, packing,
chunked log-probs); `--ours-micro-batch-tokens` overrides it for experiments only, and
`--ours-variants NAME:key=value,...` runs each ours framework once per variant (GRPOModule arguments,
`engine.*` for the paged engine's, `policy.*` for Policy's), to time settings against each other in one process.

Completion lengths: `fixed` runs every completion to the length (EOS suppressed); `lognormal` draws
each completion's length from a log-normal (median `--lognormal-median` x length, sigma
`--lognormal-sigma`) clipped at the length, and forces EOS at the drawn step: in TRL through a
logits processor given to `generate` (a finished row idles until the batch's longest is done, as
in transformers' `generate`), in ours through the sampler's `forced_lengths` hook when it has one
(else the completions are cut after sampling and the rollout runs to the full length; the JSON says
which). Draws depend only on (length, step), so every framework sees the same lengths.

Each (framework, length, distribution) point: `--warmup-steps` untimed steps for ours (default 2; TRL one),
the first of a length at the full fixed length (graphs, allocator; every point, as each builds a new GRPO
module: optimizer state, the parked reference's pinned host buffer; the second: cuDNN's plans for the shapes
that recur), then `--reps` timed steps; reported are the median s/step and its
spread (min-max), completion tokens/s (tokens actually generated / s), the update's padded-token
waste and the peak GiB over the timed steps. A TRL point whose step would take longer than
`--max-step-s` (extrapolated linearly from its previous length) is skipped and reported as such;
after an out-of-memory error the longer lengths of that framework are skipped.
`--equal-tokens` gives a log-normal point as many prompts as make its expected completion tokens the
fixed point's (its tokens/s then compares the same work), `--equal-tokens total` its prompt + completion tokens; `--warmup-prompts N` warms ours up at the full
length with N prompts (later points of that length, e.g. log-normal, warm up with their own prompts), `--no-warmup` times one cold step (for points too long to run twice in a time
limit; reported as such); `--profile ROWS` adds one untimed step per point under torch.profiler. Each
step also records the caching allocator's device allocations, frees and retries.
`--trl-bound-tokens N`: a TRL point longer than N runs its completions to N tokens and reports lower
bounds at its length from the rates measured in that run (`trl_bounds`); for lengths where TRL's
warm-up and timed steps at full length exceed a time limit. Sound where a decode step's cost grows
with the KV (long lengths on a GPU); on a small CPU model the per-step noise is larger than the growth.
`--trl-bound-for trl` bounds plain TRL only, so TRL + MegaBlocks runs its full length in the same process.
Prompts are random token ids written as words of a synthetic word-level tokenizer (one token per word),
and the reward is the fraction of even token ids in the completion (cheap and varied).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import add_model_args, build_model, sync  # noqa: E402

LR, WEIGHT_DECAY, MAX_GRAD_NORM, TEMPERATURE, TOP_P, MU = 1e-6, 0.0, 1.0, 1.0, 1.0, 1


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


def prompts(args, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, args.vocab, (args.prompts * steps, args.prompt_len), generator=g)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def settings(args, length: int, dist: str) -> dict:
    """What both frameworks must agree on for a point to be a comparison."""
    return {"prompts": args.prompts, "G": args.G, "prompt_len": args.prompt_len, "max_completion_len": length,
            "length_dist": dist, "beta": args.beta, "temperature": TEMPERATURE, "top_p": TOP_P, "mu": MU, "lr": LR,
            "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "gradient_checkpointing": True}


def draw_lengths(n: int, length: int, step: int, args) -> torch.Tensor:
    """[n] completion lengths in [1, length], log-normal around `median x length`; a function of (length, step)."""
    g = torch.Generator().manual_seed(1_000_003 * length + step)
    mu = math.log(max(1.0, args.lognormal_median * length))
    x = torch.exp(mu + args.lognormal_sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return x.round().clamp(1, length).long()


def point_args(args, length: int, dist: str):
    """The arguments of one (length, distribution) point: with `--equal-tokens` a log-normal point
    has as many prompts as make its expected tokens those of the fixed-length point, so the two
    tokens/s figures compare the same amount of work: `completion` counts completion tokens
    (prompts x G x length), `total` the prompt and completion tokens the step processes
    (prompts x G x (prompt_len + length))."""
    if not (args.equal_tokens and dist == "lognormal"):
        return args
    mean = draw_lengths(200_000, length, 0, args).double().mean().item()
    base = args.prompt_len if args.equal_tokens == "total" else 0
    prompts = max(1, round(args.prompts * (base + length) / (base + mean)))
    return argparse.Namespace(**{**vars(args), "prompts": prompts})


def build(args, device, megablocks: bool, kernels: str = "megablocks"):
    from r1lightning.moe import apply_moe_backend

    torch.manual_seed(0)
    model = build_model(args, device).requires_grad_(True)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.prompt_len + max(args.lengths))
    backend = apply_moe_backend(model, "megablocks" if megablocks else "grouped_mm", kernels=kernels)
    model.config.router_aux_loss_coef = 0.0  # TRL adds no load-balancing loss unless asked; neither do we
    return model, backend


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def reset_peak(device) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def allocator_counts(device) -> dict:
    """The caching allocator's cumulative counters: device allocations and frees (cudaMalloc/cudaFree)
    and retries (a failed cudaMalloc that freed cached blocks and tried again); per step as deltas."""
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def release(device) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- ours ------------------------------------------------------------------------------------------
class ForcedLengths:
    """A sampler that ends completion i at `lengths[i]` tokens (EOS there) for the timed steps.

    With an engine that has a `forced_lengths` hook the rows really stop (and free their slot);
    otherwise the completions are cut after sampling, so only the update sees the shorter lengths."""

    def __init__(self, inner, args, length, warmup: int, full: int = 1):
        # warmup: untimed calls before the timed ones; full: how many of them run at the full length
        self.inner, self.args, self.length, self.warmup, self.full = inner, args, length, warmup, min(full, warmup)
        self.calls = 0
        self.hooked = "forced_lengths" in inspect.signature(inner.generate).parameters

    def __getattr__(self, name):  # timing, last_stats, ... of the engine
        if name.startswith("__") or name == "inner":  # copies look these up before __init__ ran
            raise AttributeError(name)
        return getattr(self.inner, name)

    def generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id):
        from r1lightning.rollout import Rollout

        # timed steps draw steps 1, 2, ... (as every framework's do); later warm-ups draw 0, -1, ...
        step, self.calls = self.calls - self.warmup + 1, self.calls + 1
        if self.calls <= self.full:  # the first warm-up runs at the full length
            return self.inner.generate(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id)
        lengths = draw_lengths(prompt_ids.shape[0], self.length, step, self.args).to(prompt_ids.device)
        if self.hooked:  # a row drawn at the full length gets no EOS (truncated), as in TRL's processor
            forced = torch.where(lengths >= self.length, self.length + 1, lengths)
            return self.inner.generate(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id,
                                       forced_lengths=forced)
        r = self.inner.generate(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id)
        C = r.completion_ids.shape[1]
        col = torch.arange(C, device=lengths.device)[None]
        keep = col < lengths[:, None]  # [N, C]
        ids = torch.where(keep, r.completion_ids, pad_token_id)
        stop = (col == lengths[:, None] - 1) & (lengths[:, None] < self.length)
        ids = torch.where(stop, eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0], ids)
        logprobs = None if r.logprobs is None else r.logprobs * keep
        return Rollout(r.prompt_ids, r.prompt_mask, ids, keep.long(), lengths >= self.length, logprobs)


def parse_variant(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` (`--ours-variants`): GRPOModule arguments, `engine.*` for the paged engine's,
    `policy.*` for Policy's; values read as YAML (`engine.compile=default`, `micro_batch_tokens=16384`)."""
    import yaml

    name, _, spec = text.partition(":")
    pairs = [kv for kv in spec.split(",") if kv]
    bad = [kv for kv in pairs if "=" not in kv]
    if not name or bad:
        raise SystemExit(f"--ours-variants {text!r}: expected NAME:key=value,... ({bad[0] if bad else 'no name'})")
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def split_variant(variant: dict) -> tuple[dict, dict, dict]:
    """A variant's settings as (GRPOModule, engine, Policy) keyword arguments."""
    parts = {"engine": {}, "policy": {}, "module": {}}
    for key, value in variant.items():
        scope, _, rest = key.partition(".")
        if not (rest and scope in ("engine", "policy")):
            scope, rest = "module", key
        parts[scope][rest] = value
    return parts["module"], parts["engine"], parts["policy"]


def run_ours(args, device, tok, tokdir, megablocks: bool, liger: bool, name: str, save, cudnn: bool = False,
             offload="auto", variant: dict | None = None):
    from r1lightning.rollout import PagedSampler, StaticCacheSampler

    module_kw, engine_kw, policy_kw = split_variant(variant or {})

    model, backend = build(args, device, megablocks, args.ours_megablocks_kernels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    result = {"backend": backend, "megablocks_kernels": args.ours_megablocks_kernels, "variant": variant or {}, "points": []}
    points, failed = result["points"], False
    for length in args.lengths:
        # One engine per length: after the first distribution's warm-up at full length it stays warm.
        if args.engine == "paged":  # the engine's defaults: slots, KV budget, cache released for the update
            extra = {} if args.ours_admit_batch is None else {"admit_batch": args.ours_admit_batch}
            if args.ours_attention:
                extra["attention"] = args.ours_attention  # e.g. pool with --compile: the kernel inside the compiled step
            engine = PagedSampler(min_new_tokens=length, **{"compile": args.compile, **extra, **engine_kw})
        else:
            engine = StaticCacheSampler(min_new_tokens=length, kv_bucket=64, keep_cache=not args.free_cache,
                                        compile=args.compile)
        warm = args.no_warmup  # --no-warmup: the first step is timed cold (an upper bound on the warm time)
        for dist in args.length_dist:
            if failed:
                points.append({"length": length, "dist": dist, "skipped": "a shorter length ran out of memory"})
                continue
            try:
                points.append(ours_point(args, device, tok, tokdir, model, engine, 0 if args.no_warmup else args.warmup_steps, length, dist, liger,
                                         name, cudnn, offload, module_kw, policy_kw, full_length_warmup=not warm))
                warm = True
            except torch.cuda.OutOfMemoryError as err:
                failed = True
                points.append({"length": length, "dist": dist, "skipped": f"out of memory: {str(err)[:200]}"})
            release(device)
            print(json.dumps({"framework": name, **points[-1]}, default=str), flush=True)
            save(result)
        del engine
    del model
    release(device)
    return result


def ours_point(args, device, tok, tokdir, model, engine, warmup, length, dist, liger, name, cudnn=False, offload="auto",
               module_kw=None, policy_kw=None, full_length_warmup=True):
    import lightning as L

    args = point_args(args, length, dist)
    from r1lightning.grpo import GRPOModule
    from r1lightning.options import GRPOLossOptions, SamplingOptions
    from r1lightning.policy import Policy
    from r1lightning.rewards import Reward, register_reward
    register_reward("bench_parity")(parity_reward)  # a second registration of the same function is a no-op
    # the engine warms up at the full length once per length; later points' warm-up steps draw lengths as timed ones do
    sampler = ForcedLengths(engine, args, length, warmup, int(full_length_warmup)) if dist == "lognormal" else engine
    overrides = {} if args.ours_micro_batch_tokens is None else {"micro_batch_tokens": args.ours_micro_batch_tokens}
    overrides["offload_reference"] = overrides["offload_optimizer"] = offload
    overrides["grow_micro_batches"] = args.ours_grow_micro_batches
    overrides.update(module_kw or {})
    policy_kw = {**({"cudnn_attention": True} if cudnn else {}), **(policy_kw or {})}  # else the Policy default
    module = GRPOModule(
        Policy(config={"model_type": "olmoe"}, tokenizer=tokdir, **policy_kw), rewards=[Reward("bench_parity")],
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device == "cuda"),
        sampler=sampler, sampling=SamplingOptions(num_samples=args.G, max_new_tokens=length, temperature=TEMPERATURE, top_p=TOP_P),
        loss=GRPOLossOptions(beta=args.beta), num_iterations=MU, max_grad_norm=MAX_GRAD_NORM, router_aux_loss_coef=0.0, lr_schedule="constant",
        log_completions_every=0, logprob_impl="liger" if liger else "chunked", **overrides,
    )
    module.model = model  # built once per framework (on the GPU, bf16), not by Policy.build
    module.is_moe, module.aux_coef = True, 0.0
    h, s = module.hparams, module.sampling
    got = {"prompts": args.prompts, "G": s.num_samples, "prompt_len": args.prompt_len, "max_completion_len": s.max_new_tokens,
           "length_dist": dist, "beta": module.loss.beta, "temperature": s.temperature, "top_p": s.top_p, "mu": h.num_iterations,
           "lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": h.max_grad_norm,
           "gradient_checkpointing": bool(model.is_gradient_checkpointing)}
    assert got == settings(args, length, dist), (got, settings(args, length, dist))

    steps = warmup + args.reps + bool(args.profile)  # --profile: one more step, under the profiler, not timed
    # prompts per step; --warmup-prompts shrinks only a length's full-length warm-up (a later point's runs at its drawn
    # lengths and its own width: the slots and graphs its timed steps use)
    first = (args.warmup_prompts if full_length_warmup else None) or args.prompts
    sizes = [first] * min(warmup, 1) + [args.prompts] * (steps - min(warmup, 1))
    texts = prompts(args, steps)[: sum(sizes)]
    enc = tok(texts, return_tensors="pt", padding=True)
    starts = [sum(sizes[:i]) for i in range(steps)]
    batches = [{"prompt_ids": enc["input_ids"][a : a + n], "prompt_mask": enc["attention_mask"][a : a + n], "columns": {}}
               for a, n in zip(starts, sizes)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    rec = []

    class Timer(L.Callback):
        profiler = None
        reserved, reserve_s = 0, 0.0  # host buffers pinned before the first timed step, and the seconds that took

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup and warmup:  # before the first timed step, untimed, like compilation
                # host buffers the timed steps' offloads will use: the warm-up's rollout had no optimizer state
                # to move, so the first timed step would pin it (19.7 s for 25.8 GiB, session 14)
                t0 = time.perf_counter()
                self.reserved = sum(off.reserve() for off in pl_module.rollout_offloads(batch).values())
                self.reserve_s = time.perf_counter() - t0
            if args.profile and batch_idx == steps - 1:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []))
                self.profiler.__enter__()
            sync()
            reset_peak(device)
            self.alloc0 = allocator_counts(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            if self.profiler is not None:  # the extra step: where its time went, not a timed step
                self.profiler.__exit__(None, None, None)
                key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
                table = self.profiler.key_averages().table(sort_by=key, row_limit=args.profile)
                print(f"# profile: {name} {length} {dist}\n{table}", flush=True)
                if args.json:
                    with open(f"{os.path.splitext(args.json)[0]}.profile_{length}_{dist}.txt", "w") as f:
                        f.write(table + "\n\n" + self.profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                                                     row_limit=args.profile))
                self.profiler = None
                return
            m = trainer.callback_metrics
            rec.append({"allocator": {k: v - self.alloc0.get(k, 0) for k, v in allocator_counts(device).items()},"step_s": time.perf_counter() - self.t0, "rollout_s": float(m["train/time/rollout"]),
                        "reference_s": float(m["train/time/reference"]), "update_s": float(m["train/time/train"]),
                        "completion_tokens": float(m["train/completions/mean_length"]) * sizes[batch_idx] * args.G,
                        # every prompt is prompt_len words of the word-level tokenizer, one token each
                        "prompt_tokens": sizes[batch_idx] * args.G * args.prompt_len,
                        "padding": float(m["train/update/padding"]), "micro_batches": float(m["train/update/micro_batches"]),
                        "reference_offloaded": float(m.get("train/offload/reference", 0.0)),
                        "optimizer_offloaded": float(m.get("train/offload/optimizer", 0.0)),
                        # the update ran with the reference parked on the host (offload_reference auto)
                        "reference_parked": float(m.get("train/offload/reference_update", 0.0)),
                        "reference_micro_batches": float(m.get("train/reference/micro_batches", 0.0)),
                        "token_budget": float(m.get("train/update/token_budget", 0.0)),
                        # whether freeing the KV for the update needed a full gc.collect() (a cycle held it)
                        "release_collected": getattr(engine, "last_release_collected", None),
                        **{f"rollout_{k}": engine.last_stats.get(k)  # where the rollout's time goes
                           for k in ("decode_s", "prefill_s", "capture_s", "graphs", "preempted", "slots", "kv_bytes")},
                        "decode_fit": decode_fit(engine.last_stats.get("decode_rounds"),
                                                 engine.kv_token_bytes(model, torch.device(device))
                                                 if hasattr(engine, "kv_token_bytes") else None),
                        # GRPOModule resets the peak at each phase and logs each phase's peak
                        **{k[len("train/memory/"):]: float(v) for k, v in m.items() if k.startswith("train/memory/")}})
            rec[-1]["peak_GiB"] = max([peak_gib(device)] + [v for k, v in rec[-1].items() if k.endswith("_GiB")])
            print(json.dumps({"framework": name, "length": length, "dist": dist, "step": batch_idx, **rec[-1]}), flush=True)

    engine.timing = True
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-true", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    extra = {"engine": type(engine).__name__, "cudnn_attention": module.policy.cudnn_attention, "offload_reference": h.offload_reference,
             "offload_optimizer": h.offload_optimizer, "grow_micro_batches": h.grow_micro_batches,
             "micro_batch_tokens": h.micro_batch_tokens, "logprob_impl": h.logprob_impl,
             "warmup_prompts": sizes[0] if warmup else None, "warmup_steps": warmup,
             "forced_lengths": "engine" if getattr(sampler, "hooked", False) else ("post-hoc" if dist == "lognormal" else None),
             "decode_fit": rec[-1].get("decode_fit"),  # the last timed step's
             "host_reserved": timer.reserved, "host_reserve_s": timer.reserve_s}
    del trainer, module, sampler
    return summarize(length, dist, rec, warmup, settings(args, length, dist), extra)


def decode_fit(rounds, bytes_per_token) -> dict | None:
    """A decode step's time split as fixed + per GB of KV read, least squares over the engine's rounds
    (`decode_rounds`: steps, live slots, their KV tokens at the round's start, seconds) at the widest
    live count, where the experts' and the rest's cost is one constant. Each live slot reads its own KV
    (pool attention), which grows by one token a step. Returns fixed ms, ms per GB, the implied GB/s
    and the fit's r^2; None without enough rounds at that width."""
    if not rounds or not bytes_per_token:
        return None
    top = max(r[1] for r in rounds)
    pts = [((kv + live * (k - 1) / 2) * bytes_per_token / 1e9, 1e3 * sec / k) for k, live, kv, sec in rounds if live == top]
    n = len(pts)
    if n < 3:
        return None
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in pts) / ss_tot if ss_tot else 1.0
    return {"fixed_ms": a, "ms_per_GB": b, "GB_per_s": 1e3 / b if b > 0 else None, "rounds": n, "live": top, "r2": r2}


# -- TRL -------------------------------------------------------------------------------------------
def trl_micro_batch(args, length: int) -> int:
    """TRL's per-device batch: `--trl-micro-tokens` worth of sequences, a power of two dividing prompts x G."""
    n = args.prompts * args.G
    micro = max(1, min(args.trl_micro_batch, args.trl_micro_tokens // (args.prompt_len + length)))
    micro = 2 ** int(math.log2(micro))
    while n % micro:
        micro //= 2
    return micro


def run_trl(args, device, tok, tokdir, megablocks: bool, name: str, save):
    import trl

    modeldir = os.path.join(args.workdir, "model")
    if not os.path.exists(os.path.join(modeldir, "config.json")):
        model, _ = build(args, device, False)
        model.save_pretrained(modeldir)  # TRL loads policy and reference from a path
        tok.save_pretrained(modeldir)
        del model
        release(device)
    result = {"backend": "megablocks" if megablocks else "grouped_mm", "trl": trl.__version__, "points": []}
    points, last, failed = result["points"], None, False
    for length in args.lengths:
        for dist in args.trl_length_dist or args.length_dist:
            predicted = None if last is None else last[1] * length / last[0]
            bound = args.trl_bound_tokens if args.trl_bound_tokens and length > args.trl_bound_tokens and dist == "fixed" \
                and (not args.trl_bound_for or name in args.trl_bound_for) else None
            if failed:
                points.append({"length": length, "dist": dist, "skipped": "a shorter length ran out of memory"})
            elif bound is None and predicted is not None and predicted > args.max_step_s:
                points.append({"length": length, "dist": dist,
                               "skipped": f"predicted {predicted:.0f} s/step > --max-step-s {args.max_step_s:.0f}"})
            else:
                try:
                    def partial(rec, length=length, dist=dist):  # kept if a time limit stops the point's later steps
                        result["partial"] = summarize(length, dist, rec, 1, settings(point_args(args, length, dist), length, dist),
                                                      {"partial": True})
                        save(result)

                    points.append(trl_point(args, device, tok, modeldir, length, dist, megablocks, name, bound, partial))
                    result.pop("partial", None)
                    if dist == "fixed" and bound is None:
                        last = (length, points[-1]["step_s"])
                except torch.cuda.OutOfMemoryError as err:
                    failed = True
                    points.append({"length": length, "dist": dist, "skipped": f"out of memory: {str(err)[:200]}"})
            release(device)
            print(json.dumps({"framework": name, **points[-1]}, default=str), flush=True)
            save(result)
    return result


def trl_point(args, device, tok, modeldir, length, dist, megablocks, name, bound=None, partial=None):
    """One TRL point. With `bound` = N < length, TRL is configured for `length` but its `generate` runs N
    tokens (`--trl-bound-tokens`): the point reports lower bounds at `length` from the rates measured
    (`trl_bounds`), for lengths whose two full steps would not fit a time limit."""
    import datasets
    import trl
    from transformers import LogitsProcessor, TrainerCallback

    from r1lightning.moe import apply_moe_backend

    args = point_args(args, length, dist)
    fields = trl.GRPOConfig.__dataclass_fields__
    micro = trl_micro_batch(args, length)
    steps = 1 + (args.reps if args.trl_reps is None else args.trl_reps)
    want = dict(
        output_dir=os.path.join(args.workdir, "trl_out"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.prompts * args.G // micro, num_generations=args.G,
        max_completion_length=length, max_prompt_length=args.prompt_len, temperature=TEMPERATURE, top_p=TOP_P,
        beta=args.beta, num_iterations=MU, use_vllm=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device == "cuda", learning_rate=LR,
        weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, logging_steps=1, max_steps=steps, report_to=[],
        save_strategy="no", generation_kwargs={"min_new_tokens": length}, seed=0, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.bfloat16}, use_cpu=device == "cpu", log_completions=False,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", lr_scheduler_type="constant",
        shuffle_dataset=False,
    )
    cfg = trl.GRPOConfig(**{k: v for k, v in want.items() if k in fields})
    got = {"prompts": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations,
           "G": cfg.num_generations, "prompt_len": args.prompt_len, "max_completion_len": cfg.max_completion_length,
           "length_dist": dist, "beta": cfg.beta, "temperature": cfg.temperature, "top_p": cfg.top_p, "mu": cfg.num_iterations,
           "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
           "gradient_checkpointing": cfg.gradient_checkpointing}
    assert got == settings(args, length, dist), (got, settings(args, length, dist))
    ds = datasets.Dataset.from_dict({"prompt": prompts(args, steps)})
    trainer = trl.GRPOTrainer(model=modeldir, reward_funcs=[parity_reward], args=cfg, train_dataset=ds,
                              processing_class=tok)
    if megablocks:
        for m in (trainer.model, getattr(trainer, "ref_model", None)):
            if m is not None:
                apply_moe_backend(m, "megablocks")
    timers = {"rollout": 0.0, "reference": 0.0}
    calls = {"generate": 0}
    clocks: list[list[float]] = []  # bound mode: per generate call, the host time of each decode step

    class StepClock(LogitsProcessor):
        """The host time each step's logits are processed (generate syncs every step on its stopping check,
        so the host keeps pace with the device; only the first call syncs here)."""

        def __init__(self):
            self.times = []
            clocks.append(self.times)

        def __call__(self, input_ids, scores):
            if not self.times:
                sync()
            self.times.append(time.perf_counter())
            return scores

    class ForceEOS(LogitsProcessor):
        """EOS at each row's drawn length (rows are ordered as in the batch, prompts first seen at step 0)."""

        def __init__(self, lengths, eos):
            self.lengths, self.eos, self.prompt_len = lengths, eos, None

        def __call__(self, input_ids, scores):
            if self.prompt_len is None:
                self.prompt_len = input_ids.shape[1]
            step = input_ids.shape[1] - self.prompt_len  # tokens generated so far
            hit = (self.lengths.to(scores.device) - 1 == step) & (self.lengths.to(scores.device) < length)
            if hit.any():
                scores[hit] = float("-inf")
                scores[hit, self.eos] = 0.0
            return scores

    def timed(fn, key_of, force=False):
        def wrapper(*a, **kw):
            key = key_of(a, kw)
            if force and dist == "lognormal":
                calls["generate"] += 1
                if calls["generate"] > 1:  # the first call is the warm-up at full length
                    ids = kw.get("input_ids", a[0] if a else None)
                    lengths = draw_lengths(ids.shape[0], length, calls["generate"] - 1, args)
                    kw["logits_processor"] = [ForceEOS(lengths, tok.eos_token_id)]
            if key is None:
                return fn(*a, **kw)
            sync()
            t0 = time.perf_counter()
            if bound and key == "rollout":  # TRL's own generation config, cut to `bound` tokens
                import copy

                cfg = copy.deepcopy(kw["generation_config"])
                cfg.max_new_tokens = cfg.min_new_tokens = bound
                kw["generation_config"] = cfg
                kw["logits_processor"] = list(kw.get("logits_processor") or []) + [StepClock()]
                reset_peak(device)
            out = fn(*a, **kw)
            sync()
            timers[key] += time.perf_counter() - t0
            if bound and key == "rollout":
                timers["rollout_peak_GiB"] = peak_gib(device)
            return out
        return wrapper

    policy = trainer.model
    policy.generate = timed(policy.generate, lambda a, kw: "rollout", force=True)
    ref = getattr(trainer, "ref_model", None)
    name_ = "_get_per_token_logps_and_entropies" if hasattr(trainer, "_get_per_token_logps_and_entropies") else "_get_per_token_logps"
    orig = getattr(trainer, name_)
    setattr(trainer, name_, timed(orig, lambda a, kw: "reference" if ref is not None and (a[0] if a else kw.get("model")) is ref else None))

    rec = []

    class Timer(TrainerCallback):
        last = None

        def on_step_begin(self, a, state, control, **kw):
            if Timer.last is None:
                sync()
                Timer.last = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and rec and "completion_tokens" not in rec[-1]:
                mean_len = logs.get("completions/mean_length")
                max_len = logs.get("completions/max_length")
                if mean_len is not None:
                    n = args.prompts * args.G
                    rec[-1]["completion_tokens"] = mean_len * n
                    if max_len:  # TRL pads every sequence of a batch to its longest completion
                        rec[-1]["padding"] = 1 - (args.prompt_len + mean_len) / (args.prompt_len + max_len)

        def on_step_end(self, a, state, control, **kw):
            sync()
            now = time.perf_counter()
            r = {"step_s": now - Timer.last, "rollout_s": timers["rollout"], "reference_s": timers["reference"]}
            r["update_s"] = r["step_s"] - r["rollout_s"] - r["reference_s"]
            r["peak_GiB"] = peak_gib(device)
            if bound:
                r.update(step_times=clocks[-1], rollout_peak_GiB=timers.get("rollout_peak_GiB", 0.0))
            rec.append(r)
            print(json.dumps({"framework": name, "length": length, "dist": dist, "step": state.global_step, **r}), flush=True)
            if partial is not None and len(rec) > 1:  # the warm-up and at least one timed step
                partial(rec)
            timers["rollout"] = timers["reference"] = 0.0
            reset_peak(device)
            sync()
            Timer.last = time.perf_counter()

    trainer.add_callback(Timer())
    reset_peak(device)
    trainer.train()
    from r1lightning.rollout.paged import kv_bytes_per_token

    # K and V per generated token, what transformers' cache keeps (the shape the paged engine sizes blocks by)
    kv_per_token = kv_bytes_per_token(trainer.model, next(trainer.model.parameters()).device)
    del trainer
    point = summarize(length, dist, rec, 1, settings(args, length, dist), {"micro_batch": micro})
    if bound:
        point.update(trl_bounds(rec[1:] or rec, length, bound, args.prompts * args.G, kv_per_token))
    return point


def trl_bounds(timed: list[dict], length: int, n: int, rows: int, kv_per_token: int, window: int = 32,
               tail: float = 0.25) -> dict:
    """Lower bounds at `length` from steps whose `generate` ran `n` tokens.

    Rollout: the n tokens took `rollout_s`; each of the length - n decode steps still to come costs at
    least the fastest window of `window` consecutive steps among the last `tail` of the steps seen (the
    KV only grows, so a later step reads more and transformers' cache appends more than any step seen):
    rollout >= rollout_n + (length - n) x that step time. The fastest window, not the mean, keeps noise
    from lifting the bound; taking it from the last steps rather than all (session 10: from the first
    ones, at the shortest KV) keeps the bound from being loose by the growth seen within the n tokens. The step is bounded by its
    rollout alone (the reference and update at `length` are not bounded from n tokens: TRL's micro-batches
    for `length` hold fewer tokens at n). Peak memory >= the peak while generating n tokens + the KV of
    the length - n tokens every row still has to append."""
    def fastest(times):
        gaps = [b - a for a, b in zip(times, times[1:])]
        gaps = gaps[-max(window, int(len(gaps) * tail)):]  # the steps at the longest KV seen
        w = max(1, min(window, len(gaps)))
        return min(sum(gaps[i : i + w]) / w for i in range(len(gaps) - w + 1)) if gaps else 0.0

    rollout = [s["rollout_s"] + (length - n) * fastest(s["step_times"]) for s in timed]
    peak = [s["rollout_peak_GiB"] + rows * (length - n) * kv_per_token / 2**30 for s in timed]
    return {"bound_from_tokens": n, "rollout_s_lower": min(rollout), "step_s_lower": min(rollout),
            "peak_GiB_lower": min(peak), "decode_step_ms_floor": 1e3 * min(fastest(s["step_times"]) for s in timed),
            "measured_at_n": {k: statistics.median(s[k] for s in timed) for k in ("step_s", "rollout_s", "rollout_peak_GiB")}}


# -- report ----------------------------------------------------------------------------------------
def summarize(length, dist, rec, warmup, setting, extra) -> dict:
    timed = rec[warmup:] or rec  # a warm-up step runs at the full length
    med = {k: statistics.median(s[k] for s in timed) for k in ("step_s", "rollout_s", "reference_s", "update_s")}
    med.update({k: statistics.median(s[k] for s in timed) for k in ("rollout_decode_s", "rollout_prefill_s", "rollout_capture_s",
                                                                   "micro_batches", "reference_micro_batches", "token_budget")
                if all(isinstance(s.get(k), (int, float)) for s in timed)})
    tokens = [s.get("completion_tokens") for s in timed]
    tok_s = [t / s["step_s"] for t, s in zip(tokens, timed) if t is not None]
    # prompt + completion tokens per second: the rate at equal total tokens (a long-tailed point at
    # equal completion tokens has ~3x the prompts of a fixed one)
    total_s = [(t + s["prompt_tokens"]) / s["step_s"] for t, s in zip(tokens, timed) if t is not None and "prompt_tokens" in s]
    pads = [s["padding"] for s in timed if s.get("padding") is not None]
    return {"length": length, "dist": dist, **med, "step_s_min": min(s["step_s"] for s in timed),
            "step_s_max": max(s["step_s"] for s in timed), "reps": len(timed),
            "completion_tokens": statistics.mean(tokens) if all(t is not None for t in tokens) else None,
            "completion_tok_s": statistics.median(tok_s) if tok_s else None,
            "total_tok_s": statistics.median(total_s) if total_s else None,
            "padding": statistics.mean(pads) if pads else None, "warmup_step_s": rec[0]["step_s"] if warmup else None,
            "peak_GiB": max(s["peak_GiB"] for s in timed), "settings": setting, **extra,
            # ours: timed steps that sampled with the reference on the host (offload_reference: auto)
            **{k: sum(s[k] for s in timed) for k in ("reference_offloaded", "optimizer_offloaded", "reference_parked")
               if all(k in s for s in timed)},
            **{f"{phase}_GiB": max(s[f"{phase}_GiB"] for s in timed)  # ours: the peak of each phase
               for phase in ("rollout", "reference", "update") if all(f"{phase}_GiB" in s for s in timed)}}


def phases(p: dict) -> str:
    if "update_GiB" not in p:
        return ""
    return f" ({p['rollout_GiB']:.1f} / {p['reference_GiB']:.1f} / {p['update_GiB']:.1f})"


def fit_note(p: dict) -> str:
    """A point's decode step as fixed + per GB of KV read (`decode_fit`), for the rollout cell."""
    f = p.get("decode_fit")
    if not f or not f.get("GB_per_s"):
        return ""
    return f" (step {f['fixed_ms']:.1f} ms + {f['ms_per_GB']:.2f} ms/GB of KV: {f['GB_per_s']:,.0f} GB/s)"


def table(results: dict) -> str:
    lines = ["| length | dist | framework | s / step (min-max) | rollout s | reference s | update s | completion tokens/s "
             "| prompt + completion tokens/s | mean tokens | padding | peak GiB (rollout / reference / update) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [(p["length"], p["dist"], fw, p) for fw, r in results.items() for p in r.get("points", [])]
    order = {d: i for i, d in enumerate(["fixed", "lognormal"])}
    for length, dist, fw, p in sorted(rows, key=lambda x: (x[0], order.get(x[1], 9))):
        if "skipped" in p:
            lines.append(f"| {length:,} | {dist} | {fw} | {p['skipped']} | | | | | | | | |")
            continue
        if "bound_from_tokens" in p:  # measured at n tokens: lower bounds only
            lines.append(f"| {length:,} | {dist} | {fw} | ≥ {p['step_s_lower']:.2f} (bound from {p['bound_from_tokens']:,} tokens) "
                         f"| ≥ {p['rollout_s_lower']:.2f} | | | | | | | ≥ {p['peak_GiB_lower']:.1f} |")
            continue
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {length:,} | {dist} | {fw} | {p['step_s']:.2f} ({p['step_s_min']:.2f}-{p['step_s_max']:.2f}) | {p['rollout_s']:.2f}{fit_note(p)} "
            f"| {p['reference_s']:.2f} | {p['update_s']:.2f} | {fmt(p['completion_tok_s'], ',.0f')} "
            f"| {fmt(p.get('total_tok_s'), ',.0f')} "
            f"| {fmt(p['completion_tokens'] and p['completion_tokens'] / (p['settings']['prompts'] * p['settings']['G']), ',.0f')} "
            f"| {fmt(p['padding'] and 100 * p['padding'], '.1f')}% | {p['peak_GiB']:.1f}{phases(p)} |")
    return "\n".join(lines)


def comparisons(results: dict) -> str:
    """Issue 13's criteria, from one run's points: for each length and distribution, each `ours*` framework
    against each TRL one (step time ratio and peak GiB), and each long-tailed point's share of its fixed
    point's tokens/s. A TRL point bounded from fewer tokens gives a lower bound on the ratio (≥) and on its
    peak; the peak comparison then holds only where ours is below that bound."""
    points = {(fw, p["length"], p["dist"]): p for fw, r in results.items() for p in r.get("points", []) if "skipped" not in p}
    lines = ["| length | dist | ours | other | other s / ours s | peak GiB: ours vs other | ours peak ≤ other's |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (fw, length, dist), p in sorted(points.items(), key=lambda x: (x[0][1], x[0][2], x[0][0])):
        if not fw.startswith("ours"):
            continue
        for other in sorted(f for f in results if f.startswith("trl")):
            q = points.get((other, length, dist))
            if q is None:
                continue
            bound = "bound_from_tokens" in q
            their_s, their_peak = (q["step_s_lower"], q["peak_GiB_lower"]) if bound else (q["step_s"], q["peak_GiB"])
            ge = "≥ " if bound else ""
            below = p["peak_GiB"] <= their_peak
            verdict = "yes" if below else ("not shown" if bound else "no")
            lines.append(f"| {length:,} | {dist} | {fw} | {other} | {ge}{their_s / p['step_s']:.2f}× "
                         f"| {p['peak_GiB']:.1f} vs {ge}{their_peak:.1f} | {verdict} |")
    shares = []
    for (fw, length, dist), p in sorted(points.items(), key=lambda x: (x[0][1], x[0][0])):
        fixed = points.get((fw, length, "fixed"))
        if dist == "lognormal" and fixed is not None and "bound_from_tokens" not in p and p.get("completion_tok_s"):
            total = "–" if not (p.get("total_tok_s") and fixed.get("total_tok_s")) else f"{100 * p['total_tok_s'] / fixed['total_tok_s']:.1f} %"
            shares.append(f"| {length:,} | {fw} | {p['settings']['prompts']} vs {fixed['settings']['prompts']} "
                          f"| {100 * p['completion_tok_s'] / fixed['completion_tok_s']:.1f} % | {total} |")
    if shares:
        lines += ["", "| length | framework | prompts (long-tailed vs fixed) | completion tokens/s share | prompt + completion tokens/s share |",
                  "| --- | --- | --- | --- | --- |"] + shares
    return "\n".join(lines)


def head_bench(args) -> dict:
    """The LM head alone: per-token log-probs + entropy, forward and backward, for `--head-tokens`
    tokens of the model's hidden/vocab shape (bf16): chunked PyTorch vs liger-kernel vs full logits."""
    from r1lightning.logprobs import liger_available, token_logprobs

    dev = args.device
    H, V = args.hidden, args.vocab
    out = {}
    for M in args.head_tokens:
        g = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(M, H, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(V, H, device=dev, generator=g) / H**0.5).to(torch.bfloat16).requires_grad_(True)
        targets = torch.randint(0, V, (M,), device=dev, generator=g)
        upstream = torch.linspace(-1, 1, M, device=dev)
        for impl in ["chunked"] + (["liger"] if liger_available() else []) + ["full"]:
            def once():
                logp, _ = token_logprobs(hidden, weight, targets, temperature=0.9, with_entropy=True, impl=impl)
                (logp * upstream).sum().backward()
                hidden.grad = weight.grad = None
            try:
                once()
                sync()
                reset_peak(dev)
                base = torch.cuda.memory_allocated() if dev == "cuda" else 0
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    once()
                    sync()
                    times.append(time.perf_counter() - t0)
                r = {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
                     "extra_peak_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else 0.0}
            except torch.cuda.OutOfMemoryError:
                r = {"skipped": "out of memory"}
            release(dev)
            out[f"{impl}@{M}"] = r
            print(json.dumps({"head": impl, "tokens": M, **r}), flush=True)
    return out


# `_cudnn`: ours with SDPA's cuDNN kernel always allowed (Policy.cudnn_attention true; the default is auto);
# `_no_offload`: ours with offload_reference and offload_optimizer false (both stay on the GPU while sampling)
FRAMEWORKS = ["ours", "ours_megablocks", "ours_liger", "ours_megablocks_liger", "ours_megablocks_cudnn",
              "ours_megablocks_no_offload", "trl", "trl_megablocks"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frameworks", nargs="*", default=["ours"], choices=FRAMEWORKS)
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="completion lengths to sweep (default: --new-tokens)")
    ap.add_argument("--new-tokens", type=int, default=256, help="the completion length when --lengths is not given")
    ap.add_argument("--length-dist", nargs="+", default=["fixed"], choices=["fixed", "lognormal"])
    ap.add_argument("--lognormal-median", type=float, default=0.25, help="median drawn length as a fraction of the length")
    ap.add_argument("--lognormal-sigma", type=float, default=1.0)
    ap.add_argument("--equal-tokens", nargs="?", const="completion", default=None, choices=["completion", "total"],
                    help="log-normal points get more prompts: as many expected completion tokens (default) or prompt + "
                         "completion tokens (`total`) as the fixed point")
    ap.add_argument("--trl-length-dist", nargs="+", default=None, choices=["fixed", "lognormal"],
                    help="TRL: the distributions to run (default: --length-dist)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="ours: one extra step per point under torch.profiler (not timed); prints the top ROWS ops by "
                         "device time (and writes them beside --json)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="ours: no warm-up step (the timed steps include first-call compilation and allocation; "
                         "for a point whose two steps exceed a time limit, reported as cold)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="ours: untimed steps per point before the timed ones (the first at the full length). Two by "
                         "default: with cudnn_attention auto the first step whose shapes recur builds cuDNN's plans, "
                         "3.5 s at 256 tokens (session 15); 1 for points too long to run three times")
    ap.add_argument("--warmup-prompts", type=int, default=None,
                    help="ours: prompts in a length's first warm-up step, which runs every completion to the full length "
                         "(graphs, kernels, allocator at that length; default --prompts), for points too long to run twice; "
                         "later points of the length warm up with their own prompts")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per point, after one warm-up step")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per point including the warm-up (sets --reps to this - --warmup-steps)")
    ap.add_argument("--ours-micro-batch-tokens", type=int, default=None, help="ours: override the default token budget")
    ap.add_argument("--ours-grow-micro-batches", action="store_true",
                    help="ours: grow_micro_batches (the update's token budget fills memory the rollout already used)")
    ap.add_argument("--ours-variants", nargs="+", default=[], metavar="NAME:KEY=VALUE,...",
                    help="ours: run each ours framework once per variant (named FRAMEWORK:NAME; `NAME:` alone = defaults), "
                         "with these GRPOModule / `engine.*` / `policy.*` arguments, to time settings in one process")
    ap.add_argument("--ours-admit-batch", type=int, default=None, help="ours: override the paged engine's admit_batch")
    ap.add_argument("--ours-attention", default=None, choices=["auto", "pool", "gather"],
                    help="ours: override the paged engine's attention (auto takes gather under --compile)")
    ap.add_argument("--ours-megablocks-kernels", default="megablocks", choices=["megablocks", "torch"],
                    help="ours: the MegaBlocks experts' kernels (Policy.megablocks_kernels)")
    ap.add_argument("--trl-micro-batch", type=int, default=32, help="TRL: most sequences per forward/backward")
    ap.add_argument("--trl-micro-tokens", type=int, default=32 * 1152,
                    help="TRL: tokens per forward/backward (32 x (128 + 1024), what fit at 1,024 tokens)")
    ap.add_argument("--max-step-s", type=float, default=120.0, help="skip a TRL point predicted slower than this")
    ap.add_argument("--engine", default="paged", choices=["paged", "static"],
                    help="ours: the rollout engine (paged: continuous batching over paged KV, its default budget)")
    ap.add_argument("--free-cache", action="store_true", help="ours: free the KV cache and graphs after each rollout")
    ap.add_argument("--compile", default=None, help="ours: the engine's torch.compile mode for the decode step")
    ap.add_argument("--trl-reps", type=int, default=None, help="TRL: timed steps per point (default: --reps)")
    ap.add_argument("--trl-bound-tokens", type=int, default=None, metavar="N",
                    help="TRL: fixed-length points longer than N run N tokens and report lower bounds at their length "
                         "(rollout from the measured per-step rate, peak memory from the KV still to come)")
    ap.add_argument("--trl-bound-for", nargs="+", default=None, choices=["trl", "trl_megablocks"],
                    help="TRL: the frameworks --trl-bound-tokens applies to (default: both)")
    ap.add_argument("--head-tokens", type=int, nargs="*", default=[],
                    help="first time the LM head alone (chunked / liger / full logits) at these token counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.lengths = args.lengths or [args.new_tokens]
    if args.steps is not None:
        args.reps = max(1, args.steps - (0 if args.no_warmup else args.warmup_steps))
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_grpo_")
    tokdir = os.path.join(args.workdir, "tokenizer")
    tok = make_tokenizer(args.vocab, tokdir)
    out = {"args": vars(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "results": {}}
    if args.head_tokens:
        out["head"] = head_bench(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
    for fw in args.frameworks:
        megablocks, liger, cudnn = "megablocks" in fw, fw.endswith("liger"), fw.endswith("_cudnn")

        def save(result, label=fw):  # after every point, so a crash or a time limit keeps what ran
            out["results"][label] = result
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1, default=str)

        runs = [(fw, None)] if not fw.startswith("ours") else \
            [(fw if v is None else f"{fw}:{v}", spec) for v, spec in [parse_variant(t) for t in args.ours_variants] or [(None, {})]]
        for label, variant in runs:  # a failed run does not stop the next
            try:
                if fw.startswith("ours"):
                    run_ours(args, args.device, tok, tokdir, megablocks, liger, label, lambda result, label=label: save(result, label),
                             cudnn, False if fw.endswith("_no_offload") else "auto", variant)
                else:
                    run_trl(args, args.device, tok, tokdir, megablocks, fw, save)
            except Exception as err:
                import traceback

                traceback.print_exc()
                print(f"# {label} failed: {type(err).__name__}: {err}", flush=True)
            release(args.device)
    print()
    print(table(out["results"]))
    print()
    print(comparisons(out["results"]))
    return out


if __name__ == "__main__":
    main()
