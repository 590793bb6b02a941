"""Rollout throughput on an OLMoE-1B-7B-shaped policy (random init): transformers `generate` vs the
static-cache CUDA-graph engine (`r1lightning.rollout.StaticCacheSampler`). Prints a Markdown table.

    python3 scripts/bench_rollout.py                      # the H200 defaults
    python3 scripts/bench_rollout.py --layers 2 --hidden 256 --experts 8 --vocab 1024   # a quick smoke run
    python3 scripts/bench_rollout.py --length-dist lognormal --only-dist   # static vs paged engine, long-tailed lengths

`--length-dist fixed lognormal` adds sections that time the static engine against the paged one
(`PagedSampler`: continuous batching over `--slots` slots, KV in blocks) on `--dist-batch` rows in the
same process, each warm at full length (a first call where the rows of a full batch run `--new-tokens`). With
`lognormal`, row lengths are drawn log-normal (median `--median-frac` x new tokens, sigma `--sigma`),
clipped to [1, new tokens], and forced by an EOS at the drawn step (`forced_lengths`). Reported: useful
tokens/s (sum of lengths / seconds), padded-token waste (row- or slot-steps that produced no token)
and the peak device memory of the call.

Every sampled row runs the full `--new-tokens` (EOS is suppressed), so tokens/s = rows x new tokens /
seconds. "Warm" means a previous call with the same shapes has run (graphs captured, kernels loaded).

Bandwidth bound: bytes a decode step must read at least, divided by `--bandwidth` (device copy rate):
  weights = attention (q, k, v, o, norms) + router + every expert's gate/up/down (at batch >= 64 with
  top-8 of 64 every expert is hit: P(unused) = (1 - 8/64)^64 < 1e-3) + final norm + lm_head;
  embedding rows (N x H) are negligible and not counted.
  KV = K and V of every layer for every attended position, averaged over the decode steps
  (prompt + tokens so far); the engine reads up to the next `kv_bucket` boundary, also reported.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch


def add_model_args(ap) -> None:
    """The model shape options (OLMoE-1B-7B by default) that build_model reads."""
    from olmoe_shape import OLMOE_1B_7B as shape

    ap.add_argument("--layers", type=int, default=shape["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=shape["hidden_size"])
    ap.add_argument("--heads", type=int, default=shape["num_attention_heads"])
    ap.add_argument("--experts", type=int, default=shape["num_experts"])
    ap.add_argument("--top-k", type=int, default=shape["num_experts_per_tok"])
    ap.add_argument("--expert-ffn", type=int, default=shape["intermediate_size"])
    ap.add_argument("--vocab", type=int, default=shape["vocab_size"])


def build_model(args, device):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    config = OlmoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model.eval().requires_grad_(False)


def weight_bytes_per_step(model) -> dict:
    """Bytes of parameters a decode step reads (all experts), split by kind."""
    out = {"attention": 0, "experts": 0, "router": 0, "lm_head": 0, "norms": 0, "embedding (not read whole)": 0}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if p is emb:
            out["embedding (not read whole)"] += b
        elif p is head:
            out["lm_head"] += b
        elif ".experts." in name:
            out["experts"] += b
        elif ".gate." in name or "router" in name:
            out["router"] += b
        elif "norm" in name:
            out["norms"] += b
        else:
            out["attention"] += b
    out["total_read"] = sum(v for k, v in out.items() if not k.startswith("embedding"))
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_generate(model, ids, mask, new_tokens, experts, batch_api=False):
    model.set_experts_implementation(experts)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=0, eos_token_id=1)
    sync()
    t0 = time.perf_counter()
    if batch_api:
        from transformers import GenerationConfig

        gen = GenerationConfig(**kw)
        model.generate_batch(inputs=[row[m.bool()].tolist() for row, m in zip(ids, mask)], generation_config=gen)
    else:
        model.generate(input_ids=ids, attention_mask=mask, **kw)
    sync()
    return time.perf_counter() - t0


def time_engine(model, sampler, ids, mask, new_tokens):
    from r1lightning.rollout import SamplingParams

    sync()
    t0 = time.perf_counter()
    out = sampler.generate(model, ids, mask, SamplingParams(new_tokens, temperature=1.0), 1, 0)
    sync()
    return time.perf_counter() - t0, out, dict(sampler.last_stats)


def logprob_agreement(model, rollout, chunk=8):
    """Engine log-probs vs a bf16 training-style forward over prompt + completion."""
    diffs = []
    for i in range(0, rollout.completion_ids.shape[0], chunk):
        rows = slice(i, i + chunk)
        ids, mask = rollout.input_ids()[rows], rollout.attention_mask()[rows]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        P = rollout.prompt_ids.shape[1]
        lp = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, rollout.completion_ids[rows, :, None]).squeeze(-1)
        m = rollout.completion_mask[rows].bool()
        diffs.append((rollout.logprobs[rows] - lp)[m])
    d = torch.cat(diffs)
    ratio = d.exp()  # importance ratio pi_train / pi_engine would be exp(-d); report |ratio - 1|
    return {"tokens": d.numel(), "mean_abs": d.abs().mean().item(), "max_abs": d.abs().max().item(),
            "mean": d.mean().item(), "ratio_dev_mean": (ratio - 1).abs().mean().item(),
            "ratio_dev_p99": torch.quantile((ratio - 1).abs().float()[:1_000_000], 0.99).item()}


def profile_decode(model, sampler, ids, mask, steps=8):
    """Kernel time of eager decode steps, summed by kind (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    from r1lightning.rollout import SamplingParams, StaticCacheSampler

    eager = StaticCacheSampler(cuda_graphs=False, decode_experts=sampler.decode_experts, min_new_tokens=10**6)
    eager.generate(model, ids, mask, SamplingParams(4), 1, 0)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager.generate(model, ids, mask, SamplingParams(steps + 1), 1, 0)
    kinds: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0 or ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
            continue
        k = ev.key.lower()
        if "grouped" in k or "cutlass" in k and "group" in k:
            kind = "grouped GEMM (experts)"
        elif "gemm" in k or "gemv" in k or "sm90" in k or "cublas" in k or "nvjet" in k:
            kind = "dense GEMM (attention proj, router, lm_head)"
        elif "attention" in k or "fmha" in k or "flash" in k or "sdpa" in k:
            kind = "attention"
        elif "sort" in k or "radix" in k or "scan" in k:
            kind = "sort/scan"
        elif "index" in k or "gather" in k or "scatter" in k:
            kind = "index/gather/scatter"
        elif "memcpy" in k or "memset" in k:
            kind = "memcpy/memset"
        else:
            kind = "elementwise/reduction/other"
        kinds[kind] = kinds.get(kind, 0.0) + us / 1000.0
    # prefill is in the trace too: subtract it by profiling a 1-token call the same way
    with profile(activities=[ProfilerActivity.CUDA]) as prof1:
        eager.generate(model, ids, mask, SamplingParams(1), 1, 0)
    base = sum((getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) for e in prof1.key_averages()
               if not e.key.startswith(("ProfilerStep", "aten::", "cuda"))) / 1000.0
    total = sum(kinds.values())
    return {"ms_per_step_by_kind_incl_prefill": {k: v / steps for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
            "kernel_ms_per_decode_step": (total - base) / steps}


def draw_lengths(n, new_tokens, dist, median_frac, sigma, gen) -> torch.Tensor:
    """Completion lengths [n]: all `new_tokens`, or log-normal clipped to [1, new_tokens]."""
    if dist == "fixed":
        return torch.full((n,), new_tokens, dtype=torch.long)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.exp(math.log(median_frac * new_tokens) + sigma * z).round().long()
    return lengths.clamp(1, new_tokens)


def length_dist_section(model, args, device, results, gen):
    """Static vs paged engine on the same rows and drawn lengths, both warm at full length."""
    for dist in args.length_dist:
        one_length_dist(model, args, device, results, gen, dist)


def one_length_dist(model, args, device, results, gen, dist):
    from r1lightning.rollout import PagedSampler, SamplingParams, StaticCacheSampler

    B, P, C = args.dist_batch, args.prompt_len, args.new_tokens
    lengths = draw_lengths(B, C, dist, args.median_frac, args.sigma, gen)
    if args.equal_tokens and dist != "fixed":  # more rows until they hold as many tokens as B full-length rows
        while int(lengths.sum()) < B * C:
            lengths = torch.cat([lengths, draw_lengths(B, C, dist, args.median_frac, args.sigma, gen)])
        lengths = lengths[: int((lengths.cumsum(0) < B * C).sum()) + 1]
    n = lengths.numel()
    ids = torch.randint(3, args.vocab, (n, P), generator=gen).to(device)
    mask = torch.ones_like(ids)
    tokens = int(lengths.sum())
    forced = lengths.to(device)
    info = {"dist": dist, "rows": n, "tokens": tokens, "mean_len": lengths.float().mean().item(),
            "max_len": int(lengths.max()), "median_len": lengths.float().median().item()}
    print("# lengths", json.dumps(info), flush=True)
    section = results.setdefault("length_dist", {}).setdefault(dist, {"lengths": info, "rows": []})
    model.set_experts_implementation(args.prefill[0] if args.prefill[0] != "megablocks" or megablocks_ok() else "grouped_mm")
    engines = [] if args.no_static else [(f"static, batches of {B}", "static", B)]
    for slots in args.slots:
        for gib in args.kv_gib:
            for attention in args.attention:
                for admit in args.admit_batch:
                    S = slots or B
                    engines.append((f"paged, {S} slots" + (f", {gib} GiB KV" if gib else "") + f", attention {attention}"
                                    + (f", admit_batch {admit}" if admit != 1 else ""), "paged", (S, gib or None, attention, admit)))
    params = SamplingParams(C, temperature=1.0)
    for name, kind, S in engines:
        S, gib, attention, admit = S if kind == "paged" else (S, None, None, None)
        if kind == "static":
            sampler = StaticCacheSampler(kv_bucket=args.bucket, min_new_tokens=C, timing=True)
            chunks = [slice(i, min(i + B, n)) for i in range(0, n, B)]
        else:
            sampler = PagedSampler(max_slots=S, kv_cache_gib=gib, min_new_tokens=C, timing=True, attention=attention,
                                   admit_batch=admit)
            chunks = [slice(0, n)]
        try:
            # warm at full length: the first call's rows run every token (every graph captured, buffers sized)
            warm = chunks[0]
            warm_len = torch.ones(warm.stop - warm.start, dtype=torch.long, device=device)
            warm_len[: min(S, len(warm_len))] = C
            sampler.generate(model, ids[warm], mask[warm], params, 1, 0, forced_lengths=warm_len)
            sync()
            # then twice with the drawn lengths: the first pass captures what the full-length call did not
            # (the paged engine's narrower tail widths), the second is timed
            for timed in (False, True):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                steps = waste_steps = 0
                extra: dict = {}
                for rows in chunks:
                    out = sampler.generate(model, ids[rows], mask[rows], params, 1, 0, forced_lengths=forced[rows])
                    st = dict(sampler.last_stats)
                    assert torch.equal(out.completion_lengths.cpu(), lengths[rows]), "forced lengths not honoured"
                    steps += st["steps"]
                    if kind == "static":
                        waste_steps += (rows.stop - rows.start) * st["steps"]
                    else:
                        waste_steps += st["slot_steps"]
                        extra = {k: st[k] for k in ("preempted", "max_live", "admitted", "idle_slot_fraction", "kv_blocks",
                                                    "compactions", "graphs", "attention", "decode_s", "capture_s", "prefill_s")}
                sync()
                seconds = time.perf_counter() - t0
                if not timed:
                    first = seconds
            r = {"name": name, "seconds": seconds, "first_pass_s": first, "tokens": tokens, "tok_s": tokens / seconds,
                 "padded_waste": 1 - tokens / waste_steps if kind == "static" else extra["idle_slot_fraction"],
                 "decode_steps": steps, "kv_GiB": st["kv_bytes"] / 2**30,
                 "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"), **extra}
        except Exception as err:
            import traceback

            traceback.print_exc()
            r = {"name": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        section["rows"].append(r)
        print(json.dumps(r, default=str), flush=True)
        sampler.release()
        del sampler
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{dist} lengths, {n} rows x up to {C} tokens after {P} prompt tokens: {tokens:,} tokens, "
          f"mean {info['mean_len']:.0f}, median {info['median_len']:.0f}, max {info['max_len']}")
    print()
    print("| engine | tokens/s | s | padded-token waste | decode steps | KV GiB | peak GiB (call) | preempted |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in section["rows"]:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        print(f"| {r['name']} | {r['tok_s']:,.0f} | {r['seconds']:.2f} | {r['padded_waste']:.1%} | {r['decode_steps']} | "
              f"{r['kv_GiB']:.2f} | {r['peak_GiB']:.1f} | {r.get('preempted', '–')} |")
    print(flush=True)


def megablocks_ok() -> bool:
    from r1lightning.moe import megablocks_status

    return megablocks_status()[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--generate-tokens", type=int, default=256,
                    help="tokens for the timed transformers generate run (its per-step cost is flat; fewer saves time)")
    ap.add_argument("--generate", nargs="*", default=["grouped_mm"],
                    help="experts implementations to time transformers generate with (at the first batch size)")
    ap.add_argument("--generate-batch", action="store_true", help="also time transformers generate_batch")
    ap.add_argument("--prefill", nargs="+", default=["grouped_mm", "megablocks"],
                    help="experts implementation for the engine's prefill (decode always uses graph-safe grouped_mm)")
    ap.add_argument("--small-batch", type=int, default=4, help="batch for the decode-experts grouped_mm vs gather vs triton check (0: skip)")
    ap.add_argument("--bucket", type=int, default=64)
    ap.add_argument("--no-graphs", action="store_true", help="also time the engine without CUDA graphs")
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    help="also time the engine with its decode step through torch.compile in these modes "
                         "(default, reduce-overhead, max-autotune-no-cudagraphs), first batch size only")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=4.3e12)
    ap.add_argument("--time-budget", type=float, default=1e9, help="skip remaining sections after this many seconds")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--length-dist", choices=["fixed", "lognormal"], nargs="+", default=None,
                    help="add the static vs paged engine section under these completion-length distributions")
    ap.add_argument("--equal-tokens", action="store_true",
                    help="lognormal: draw more rows until they hold --dist-batch x --new-tokens tokens (the static "
                         "engine runs them in batches of --dist-batch, the paged one through its slots)")
    ap.add_argument("--only-dist", action="store_true", help="run only the --length-dist section")
    ap.add_argument("--admit-batch", type=int, nargs="+", default=[1],
                    help="paged engine: admit waiting rows once this many slots are free (each value a run)")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "pool", "gather"],
                    help="paged engines' decode attention (--length-dist section): one engine per value")
    ap.add_argument("--no-static", action="store_true", help="--length-dist section: paged engines only")
    ap.add_argument("--dist-batch", type=int, default=128, help="rows for the --length-dist section")
    ap.add_argument("--median-frac", type=float, default=0.25, help="lognormal median as a fraction of --new-tokens")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma")
    ap.add_argument("--slots", type=int, nargs="+", default=[0],
                    help="paged engine slot counts for the --length-dist section (0: one slot per row)")
    ap.add_argument("--kv-gib", type=float, nargs="+", default=[0],
                    help="paged engine KV pool sizes in GiB, each run with each --slots (0: the engine's default)")
    args = ap.parse_args(argv)

    from r1lightning.moe import apply_moe_backend, megablocks_status
    from r1lightning.rollout import StaticCacheSampler
    from r1lightning.rollout.paged import kv_bytes_per_token

    start = time.perf_counter()
    left = lambda: args.time_budget - (time.perf_counter() - start)  # noqa: E731
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(args, device)
    print(f"# model built in {time.perf_counter() - start:.1f}s on {device}", flush=True)
    results: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "rows": []}
    import transformers

    results["transformers"] = transformers.__version__
    mb_ok, mb_reason = megablocks_status()
    if mb_ok:
        apply_moe_backend(model, "megablocks")  # registers the implementation
    wb = weight_bytes_per_step(model)
    kvt = kv_bytes_per_token(model, next(model.parameters()).device)
    results["weight_bytes"] = wb
    results["kv_bytes_per_token"] = kvt
    P, C = args.prompt_len, args.new_tokens

    def bound(n):
        avg_len = P + (C - 1) / 2  # positions attended, averaged over the decode steps
        w = wb["total_read"]
        kv = n * avg_len * kvt
        buckets = [min(math.ceil((P + j) / args.bucket) * args.bucket, math.ceil((P + C) / args.bucket) * args.bucket)
                   for j in range(1, C)]
        kv_engine = n * statistics.mean(buckets) * kvt
        return {"weights_GB": w / 1e9, "kv_GB_avg": kv / 1e9, "kv_GB_engine_avg": kv_engine / 1e9,
                "tok_s_weights_only": n * args.bandwidth / w, "tok_s_weights_kv": n * args.bandwidth / (w + kv),
                "ms_step_weights_kv": (w + kv) / args.bandwidth * 1e3}

    def row(name, n, seconds, tokens, extra=None):
        r = {"name": name, "batch": n, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}
        r.update(extra or {})
        results["rows"].append(r)
        print(json.dumps(r), flush=True)

    gen = torch.Generator(device="cpu").manual_seed(0)
    if args.length_dist:
        length_dist_section(model, args, device, results, gen)
    for bi, n in enumerate([] if args.only_dist else args.batches):
        ids = torch.randint(3, args.vocab, (n, P), generator=gen).to(device)
        mask = torch.ones_like(ids)
        results.setdefault("bound", {})[n] = bound(n)
        # -- transformers generate (warm: a short call first) --
        if bi == 0:
            for impl in args.generate:
                if impl == "megablocks" and not mb_ok:
                    continue
                if left() < 60:
                    print(f"# skipped generate {impl}: time budget", flush=True)
                    continue
                try:
                    first = time_generate(model, ids, mask, 8, impl)
                    s = time_generate(model, ids, mask, args.generate_tokens, impl)
                    row(f"transformers generate ({impl}, warm)", n, s, n * args.generate_tokens,
                        {"ms_per_step": s / args.generate_tokens * 1e3, "first_call_8_tokens_s": first})
                except Exception as err:  # keep the remaining sections
                    print(f"# generate {impl} failed: {type(err).__name__}: {err}", flush=True)
            if args.generate_batch and left() > 90:
                try:
                    s = time_generate(model, ids, mask, args.generate_tokens, "grouped_mm", batch_api=True)
                    row("transformers generate_batch (grouped_mm, first call)", n, s, n * args.generate_tokens,
                        {"ms_per_step": s / args.generate_tokens * 1e3})
                except Exception as err:
                    print(f"# generate_batch failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        # -- the engine --
        for impl in args.prefill:
            if impl == "megablocks" and not mb_ok:
                print(f"# megablocks unavailable: {mb_reason}", flush=True)
                continue
            if left() < 30:
                print(f"# skipped engine {impl} at {n}: time budget", flush=True)
                continue
            model.set_experts_implementation(impl)
            sampler = StaticCacheSampler(kv_bucket=args.bucket, min_new_tokens=C, timing=True)
            try:
                s1, _, st1 = time_engine(model, sampler, ids, mask, C)
                s2, out, st2 = time_engine(model, sampler, ids, mask, C)
                row(f"engine, CUDA graphs, prefill {impl}, decode grouped_mm (first call)", n, s1, n * C,
                    {"prefill_s": st1["prefill_s"], "capture_s": st1["capture_s"], "decode_s": st1["decode_s"]})
                row(f"engine, CUDA graphs, prefill {impl}, decode grouped_mm (warm)", n, s2, n * C,
                    {"prefill_s": st2["prefill_s"], "decode_s": st2["decode_s"],
                     "ms_per_decode_step": st2["decode_s"] / (C - 1) * 1e3, "kv_cache_GB": st2["kv_bytes"] / 1e9,
                     "decode_only_tok_s": n * (C - 1) / st2["decode_s"]})
                if bi == 0 and impl == args.prefill[0] and left() > 60:
                    results["logprob_agreement"] = logprob_agreement(model, out)
                    print("# logprob agreement", json.dumps(results["logprob_agreement"]), flush=True)
            except Exception as err:
                import traceback

                traceback.print_exc()
                print(f"# engine {impl} failed: {type(err).__name__}: {err}", flush=True)
            sampler.release()
        for mode in args.compile if bi == 0 else []:
            if left() < 120:
                print(f"# skipped compile {mode}: time budget", flush=True)
                continue
            model.set_experts_implementation(args.prefill[0])
            sampler = StaticCacheSampler(kv_bucket=args.bucket, min_new_tokens=C, timing=True, compile=mode)
            graphs = "torch.compile's CUDA graphs" if mode == "reduce-overhead" else "CUDA graphs"
            try:
                s1, _, st1 = time_engine(model, sampler, ids, mask, C)
                s2, _, st2 = time_engine(model, sampler, ids, mask, C)
                row(f"engine, torch.compile {mode}, {graphs} (first call, incl. compile)", n, s1, n * C,
                    {"capture_s": st1["capture_s"], "decode_s": st1["decode_s"]})
                row(f"engine, torch.compile {mode}, {graphs} (warm)", n, s2, n * C,
                    {"prefill_s": st2["prefill_s"], "decode_s": st2["decode_s"],
                     "ms_per_decode_step": st2["decode_s"] / (C - 1) * 1e3, "decode_only_tok_s": n * (C - 1) / st2["decode_s"]})
            except Exception as err:
                import traceback

                traceback.print_exc()
                print(f"# compile {mode} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            sampler.release()
        if args.no_graphs and bi == 0 and left() > 60:
            model.set_experts_implementation(args.prefill[0])
            sampler = StaticCacheSampler(cuda_graphs=False, kv_bucket=args.bucket, min_new_tokens=C, timing=True)
            time_engine(model, sampler, ids, mask, 8)
            s, _, st = time_engine(model, sampler, ids, mask, C)
            row("engine, no graphs (eager decode), decode grouped_mm (warm)", n, s, n * C,
                {"ms_per_decode_step": st["decode_s"] / (C - 1) * 1e3})
            sampler.release()
        if args.profile and bi == 0 and device == "cuda" and left() > 60:
            try:
                results["profile"] = profile_decode(model, StaticCacheSampler(), ids, mask)
                print("# profile", json.dumps(results["profile"]), flush=True)
            except Exception as err:
                print(f"# profile failed: {type(err).__name__}: {err}", flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None

    # -- decode experts at a small batch: grouped_mm vs per-token weight gathering vs the Triton kernels --
    if args.small_batch and left() > 30 and not args.only_dist:
        from r1lightning.moe import decode_experts

        n = args.small_batch
        ids = torch.randint(3, args.vocab, (n, P), generator=gen).to(device)
        mask = torch.ones_like(ids)
        model.set_experts_implementation("grouped_mm")
        for mode in ("grouped_mm", "gather", "triton"):
            sampler = StaticCacheSampler(kv_bucket=args.bucket, min_new_tokens=64, decode_experts=mode, timing=True)
            try:
                time_engine(model, sampler, ids, mask, 64)
                s, _, st = time_engine(model, sampler, ids, mask, 64)
                row(f"engine, decode experts {mode} (warm, 64 tokens)", n, s, n * 64,
                    {"ms_per_decode_step": st["decode_s"] / 63 * 1e3})
            except Exception as err:
                print(f"# small batch {mode} failed: {type(err).__name__}: {err}", flush=True)
            sampler.release()
        decode_experts.set_decode_mode(model, "auto")

    # -- Markdown --
    if args.only_dist:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        return results
    print()
    print(f"Model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, expert FFN "
          f"{args.expert_ffn}, vocab {args.vocab}, bf16; {P} prompt tokens -> {C} sampled tokens.")
    print(f"Bytes read per decode step: weights {wb['total_read'] / 1e9:.2f} GB (attention {wb['attention'] / 1e9:.2f}, "
          f"experts {wb['experts'] / 1e9:.2f}, router {wb['router'] / 1e6:.1f} MB, lm_head {wb['lm_head'] / 1e9:.2f}); "
          f"KV {kvt / 1024:.0f} KiB per token.")
    print()
    print("| run | batch | tokens/s | ms / decode step | s total | bound (weights+KV) tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        b = results["bound"].get(r["batch"], {}) if "bound" in results else {}
        ms = r.get("ms_per_decode_step", r.get("ms_per_step"))
        print(f"| {r['name']} | {r['batch']} | {r['tok_s']:,.0f} | {ms:.2f} | {r['seconds']:.2f} | "
              f"{b.get('tok_s_weights_kv', float('nan')):,.0f} |" if ms is not None else
              f"| {r['name']} | {r['batch']} | {r['tok_s']:,.0f} | – | {r['seconds']:.2f} | {b.get('tok_s_weights_kv', float('nan')):,.0f} |")
    print()
    for n, b in results.get("bound", {}).items():
        print(f"bound at batch {n}: " + ", ".join(f"{k} {v:,.2f}" for k, v in b.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
