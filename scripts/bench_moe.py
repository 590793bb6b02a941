#!/usr/bin/env python3
"""MoE expert backends on one GPU at OLMoE-1B-7B shape: (a) one MoE layer forward+backward,
(b) whole-model training step (forward, backward, AdamW), (c) peak memory, and a kernel-time profile;
(d) with `--decode-tokens`, the experts of a decode step: grouped_mm against the Triton decode kernels.

    python3 scripts/bench_moe.py                 # Markdown tables on stdout
    python3 scripts/bench_moe.py --json out.json # also write the numbers as JSON ('-' = stdout only)
    python3 scripts/bench_moe.py --only-decode --decode-tokens 16 128 256   # (d) alone

FLOP counts (stated so the TFLOP/s and MFU can be checked):
  layer:  expert GEMMs only = 3 GEMMs (gate, up, down) x 2 x tokens x top_k x H x F x (1 fwd + 2 bwd)
  model:  6 x active params x tokens + attention 6 x B x s^2 x H x L (QK^T and PV, fwd+bwd, causal
          half); active params = per layer (4 H^2 attention + H E router + 3 k H F experts) + lm_head,
          input embedding excluded (a lookup).
MFU is against the H200's dense bf16 spec (989 TFLOP/s) and the ~790 TFLOP/s a plain bf16 matmul
reaches on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
import traceback

import torch

from cuda_timing import time_cuda, time_graph

from r1lightning.moe import experts_modules, megablocks_status
from r1lightning.moe.megablocks_experts import PAD_ROWS, register

PEAK_SPEC, PEAK_MEASURED = 989e12, 790e12
VARIANTS = {
    "eager": dict(impl="eager"),
    "grouped_mm": dict(impl="grouped_mm"),
    "megablocks": dict(impl="megablocks"),
    "megablocks_recompute": dict(impl="megablocks", recompute=True),
    "megablocks_unfused_gate": dict(impl="megablocks", fused=False),
    "megablocks_unpadded": dict(impl="megablocks", pad=0),
    "megablocks_sync_free": dict(impl="megablocks", kernels="torch"),  # no host wait (SyncFreeKernels)
}
GiB = 2**30


def set_variant(module, config, name):
    v = VARIANTS[name]
    if v["impl"] == "megablocks":
        register()
    config._experts_implementation = v["impl"]
    for _, m in experts_modules(module):
        m._r1l_recompute_activation = v.get("recompute", False)
        m._r1l_fused_gate = v.get("fused", True)
        m._r1l_pad_rows = v.get("pad", PAD_ROWS)
        m._r1l_kernels = v.get("kernels", "megablocks")


def olmoe_config(layers, **kw):
    from transformers import OlmoeConfig

    from olmoe_shape import OLMOE_1B_7B

    cfg = OlmoeConfig(**dict(OLMOE_1B_7B, num_hidden_layers=layers), output_router_logits=True,
                      router_aux_loss_coef=0.01, pad_token_id=1, bos_token_id=None, eos_token_id=50279, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


# ----------------------------------------------------------------------------------------------- (a)


def bench_layer(args, out):
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = olmoe_config(1)
    H, F, E, K, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, args.tokens
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = OlmoeSparseMoeBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    # a fresh batch every iteration: routing (so each expert's row count) changes as in training
    xs = [torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16) for _ in range(args.warmup + args.iters)]
    x = xs[0].requires_grad_(True)
    dy = torch.randn_like(x)
    with torch.no_grad():
        seen = []
        hook = block.experts.register_forward_pre_hook(lambda mod, a: seen.append(a[1]))
        set_variant(block, cfg, "grouped_mm")
        block(xs[0])
        hook.remove()
        load = torch.bincount(seen[0].flatten(), minlength=E)
    flops = 3 * 2 * T * K * H * F * 3
    out["layer"] = dict(shape=dict(tokens=T, hidden=H, experts=E, top_k=K, ffn=F, dtype="bfloat16"),
                        expert_flops=flops, tokens_per_expert_min=int(load.min()), tokens_per_expert_max=int(load.max()),
                        rows=[])

    it = [0]

    def fwd(inp=None):
        y = block(x if inp is None else inp)
        return y[0] if isinstance(y, tuple) else y

    def step():
        inp = xs[it[0] % len(xs)].requires_grad_(True)
        it[0] += 1
        inp.grad = None
        for p in block.parameters():
            p.grad = None
        fwd(inp).backward(dy)

    ref = None
    for name in args.layer_backends:
        set_variant(block, cfg, name)
        try:
            with torch.no_grad():
                y = fwd().float()
            if ref is None:
                ref = y
            err = ((y - ref).norm() / ref.norm()).item()
            ms, times = time_cuda(step, args.warmup, args.iters if name != "eager" else max(3, args.iters // 3))
            step()
            torch.cuda.synchronize()
            x.grad = None
            for p in block.parameters():
                p.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            y = fwd()
            saved = torch.cuda.memory_allocated() - base
            y.backward(dy)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del y
            row = dict(backend=name, median_ms=ms, min_ms=min(times), tflops=flops / ms / 1e9,
                       saved_activations_gib=saved / GiB, peak_gib=peak / GiB, rel_err_vs_first=err)
        except Exception as exc:  # keep the other rows
            traceback.print_exc()
            row = dict(backend=name, error=f"{type(exc).__name__}: {exc}")
        out["layer"]["rows"].append(row)
        print(f"[layer] {row}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- (b)


def active_params(cfg):
    H, F, E, K, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    per_layer = 4 * H * H + H * E + 3 * K * H * F
    return L * per_layer + cfg.vocab_size * H


def bench_model(args, out):
    from transformers import AutoModelForCausalLM

    cfg = olmoe_config(args.layers)
    B, S = args.batch, args.seq
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_active = active_params(cfg)
    flops = 6 * n_active * B * S + 6 * B * S * S * cfg.hidden_size * cfg.num_hidden_layers
    # bf16 weights + fused AdamW: fp32 master weights + fp32 Adam state for 6.9 B parameters is 110 GB
    # before activations; see docs/benchmarks.md.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(2, cfg.vocab_size, (B, S), device="cuda")
    out["model"] = dict(layers=cfg.num_hidden_layers, params=n_params, active_params=n_active, batch=B, seq=S,
                        step_flops=flops, weights="bfloat16", optimizer="torch.optim.AdamW(fused=True), bf16 state",
                        rows=[])

    def step():
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in args.model_backends:
        set_variant(model, model.config, name)
        try:
            torch.cuda.reset_peak_memory_stats()
            steps = args.steps if name != "eager" else 3
            ms, times = time_cuda(step, args.warmup if name != "eager" else 1, steps)
            row = dict(backend=name, median_ms=ms, min_ms=min(times), tokens_per_s=B * S / ms * 1e3,
                       tflops=flops / ms / 1e9, mfu_spec=flops / ms * 1e3 / PEAK_SPEC,
                       mfu_measured_peak=flops / ms * 1e3 / PEAK_MEASURED,
                       peak_gib=torch.cuda.max_memory_allocated() / GiB)
        except Exception as exc:
            traceback.print_exc()
            row = dict(backend=name, error=f"{type(exc).__name__}: {exc}")
        out["model"]["rows"].append(row)
        print(f"[model] {row}", file=sys.stderr, flush=True)

    if args.profile:
        out["profile"] = {}
        for name in args.profile:
            set_variant(model, model.config, name)
            try:
                out["profile"][name] = profile_steps(step, 2)
            except Exception as exc:
                traceback.print_exc()
                out["profile"][name] = dict(error=f"{type(exc).__name__}: {exc}")
    del model, opt
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- (d)


def bench_decode(args, out):
    """The experts of one decode step: `--decode-layers` OLMoE-shaped experts layers (each its own weights,
    so nothing stays in L2) called back to back inside one CUDA graph, as the engine's decode step does,
    for T live slots. `grouped_mm` (today's default) against the Triton kernels at each tile setting;
    bandwidth = the used experts' weight bytes / time (all 64 experts are used from T ~ 64 on); memory =
    the peak of the step's own buffers above the weights (one eager call)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    from r1lightning.moe import decode_experts as de
    from r1lightning.moe import decode_kernel as dk

    cfg = olmoe_config(1)
    H, F, E, K, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, args.decode_layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        layers = [OlmoeExperts(cfg).to(torch.bfloat16) for _ in range(L)]
    with torch.no_grad():
        for m in layers:
            for p in m.parameters():
                p.normal_(0.0, 0.02)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.decode_configs]
    rows = []
    for T in args.decode_tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        route, ids = torch.randn(T, E, device="cuda").softmax(-1).topk(K, dim=-1)
        used = int(torch.unique(ids).numel())
        bytes_read = L * used * 3 * H * F * 2
        variants = [("grouped_mm", None)] + [("triton " + "x".join(map(str, c)), c) for c in configs]
        want = None
        for name, c in variants:
            if c is None:
                for m in layers:
                    m._r1l_decode_mode = "grouped_mm"
                fn = lambda: [de.decode_experts_forward(m, x, ids, route) for m in layers]  # noqa: E731
            else:
                fn = lambda c=c: [dk.kernels(x, m.gate_up_proj, m.down_proj, False, ids, route, *c) for m in layers]  # noqa: E731
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                got = fn()[-1].float()
                transient_mib = (torch.cuda.max_memory_allocated() - base) / 2**20  # the step's own buffers
                if want is None:
                    want = got
                err = ((got - want).norm() / want.norm()).item()
                med, times = time_graph(fn, args.warmup, args.iters)
                rows.append(dict(tokens=T, variant=name, median_ms=med, min_ms=min(times), max_ms=max(times),
                                 used_experts=used, gb_per_s=bytes_read / (med / 1e3) / 1e9, rel_err_vs_grouped_mm=err,
                                 transient_mib=transient_mib))
            except Exception as err:  # a tile setting the compiler or the GPU refuses: report it and go on
                rows.append(dict(tokens=T, variant=name, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
            print(json.dumps(rows[-1]), flush=True)
    out["decode"] = dict(shape=dict(layers=L, hidden=H, experts=E, top_k=K, ffn=F, dtype="bfloat16"), rows=rows)


# ----------------------------------------------------------------------------------------------- profile

BUCKETS = [  # first match wins; kernel names lower-cased
    ("MegaBlocks gather/scatter (Triton)", r"_padded_copy|_binned_copy"),
    ("fused SwiGLU (Triton)", r"_r1l_swiglu"),
    ("sort/histogram/scan (CUB)", r"radix|histogram|devicescan|cub::|scan_kernel|sort"),
    ("attention (SDPA)", r"flash|fmha|attention|sdpa|efficient"),
    ("GEMM (experts + dense)", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas|matmul|grouped_mm"),
    ("AdamW (fused)", r"adam|multi_tensor|foreach"),
    ("index/gather/scatter (torch)", r"index|gather|scatter|put_|take"),
    ("cross-entropy/softmax", r"softmax|log_softmax|nll|cross_entropy"),
    ("memcpy/memset", r"memcpy|memset"),
    ("elementwise/reduction/other", r"."),
]


def profile_steps(step, n):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]  # not ranges like Optimizer.step#AdamW.step
    buckets, by_name, spans = {b: 0.0 for b, _ in BUCKETS}, {}, []
    for e in kernels:
        us = e.time_range.elapsed_us()
        name = e.name.lower()
        bucket = next(b for b, rx in BUCKETS if re.search(rx, name))
        buckets[bucket] += us / 1e3 / n
        by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + us / 1e3 / n
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, t in spans:  # union of kernel intervals: what the GPU was doing at all
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += 0 if cur_e is None else cur_e - cur_s
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    cpu = sorted(((a.key, a.self_cpu_time_total / 1e3 / n, a.count // n) for a in prof.key_averages()
                  if a.self_cpu_time_total > 0), key=lambda t: -t[1])[:8]
    return dict(wall_ms_per_step=wall, gpu_busy_ms_per_step=busy / 1e3 / n,
                buckets_ms={k: v for k, v in buckets.items() if v > 0}, top_kernels_ms=dict(top),
                top_cpu_ops=[dict(op=k[:80], self_cpu_ms=t, calls=c) for k, t, c in cpu])


# ----------------------------------------------------------------------------------------------- output


def _table(title, header, rows, label, cells):
    """A titled Markdown table: `label(row)` starts each line, then `cells(row)` or the row's error."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        lines.append(f"| {label(r)} | " + (f"error: {r['error']}" if "error" in r else cells(r)) + " |")
    return lines + [""]


def markdown(out):
    lines = [f"date {out['date']}, {out['device']}, torch {out['torch']}, transformers {out['transformers']}, "
             f"megablocks {out['megablocks']}", ""]
    if "decode" in out:
        s = out["decode"]["shape"]
        lines += _table(f"(d) decode experts, {s['layers']} layers in one CUDA graph: H {s['hidden']}, {s['experts']} experts, "
                        f"top-{s['top_k']}, F {s['ffn']}, {s['dtype']}",
                        ["slots", "variant", "median ms (min–max)", "used experts", "GB/s", "transient MiB",
                         "rel. err. vs grouped_mm"],
                        out["decode"]["rows"], lambda r: f"{r['tokens']} | {r['variant']}",
                        lambda r: f"{r['median_ms']:.3f} ({r['min_ms']:.3f}–{r['max_ms']:.3f}) | {r['used_experts']} | "
                                  f"{r['gb_per_s']:.0f} | {r['transient_mib']:.1f} | {r['rel_err_vs_grouped_mm']:.1e}")
    if "layer" in out:
        la = out["layer"]
        s = la["shape"]
        lines += _table(f"(a) one MoE layer fwd+bwd: {s['tokens']} tokens, H {s['hidden']}, {s['experts']} experts, "
                        f"top-{s['top_k']}, F {s['ffn']}, {s['dtype']}; expert FLOPs {la['expert_flops'] / 1e12:.2f} T; "
                        f"tokens per expert {la['tokens_per_expert_min']}..{la['tokens_per_expert_max']}",
                        ["backend", "median ms", "min ms", "expert TFLOP/s", "saved activations GiB", "peak GiB", "rel. err."],
                        la["rows"], lambda r: r["backend"],
                        lambda r: f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['tflops']:.0f} | "
                                  f"{r['saved_activations_gib']:.2f} | {r['peak_gib']:.2f} | {r['rel_err_vs_first']:.1e}")
    if "model" in out:
        mo = out["model"]
        lines += _table(f"(b) training step, OLMoE-1B-7B shape, {mo['layers']} layers, {mo['params'] / 1e9:.2f} B params "
                        f"({mo['active_params'] / 1e9:.3f} B active), {mo['batch']} x {mo['seq']} tokens, "
                        f"{mo['weights']} weights, {mo['optimizer']}; {mo['step_flops'] / 1e12:.1f} TFLOP per step",
                        ["backend", "median ms/step", "tokens/s", "TFLOP/s", "MFU (989 spec)", "MFU (790 measured)", "peak GiB"],
                        mo["rows"], lambda r: r["backend"],
                        lambda r: f"{r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                                  f"{100 * r['mfu_spec']:.1f}% | {100 * r['mfu_measured_peak']:.1f}% | {r['peak_gib']:.1f}")
    for name, p in out.get("profile", {}).items():
        if "error" in p:
            lines += [f"profile {name}: error {p['error']}", ""]
            continue
        lines += [f"profile of one training step, {name}: wall {p['wall_ms_per_step']:.1f} ms, "
                  f"GPU busy {p['gpu_busy_ms_per_step']:.1f} ms (profiler on)", "", "| kernels | ms/step |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in sorted(p["buckets_ms"].items(), key=lambda kv: -kv[1])]
        lines += ["", "| top kernels | ms/step |", "| --- | --- |"]
        lines += [f"| `{k}` | {v:.1f} |" for k, v in p["top_kernels_ms"].items()]
        lines += ["", "| top CPU ops (self time, profiler on) | ms/step | calls/step |", "| --- | --- | --- |"]
        lines += [f"| `{c['op']}` | {c['self_cpu_ms']:.1f} | {c['calls']} |" for c in p.get("top_cpu_ops", [])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="(a) tokens through the layer")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layer-backends", nargs="*", default=["eager", "grouped_mm", "megablocks", "megablocks_recompute",
                                                           "megablocks_unfused_gate", "megablocks_unpadded"])
    ap.add_argument("--model-backends", nargs="*", default=["grouped_mm", "megablocks", "megablocks_recompute",
                                                           "megablocks_unpadded"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", nargs="*", default=["grouped_mm", "megablocks"], help="backends to profile")
    ap.add_argument("--decode-tokens", type=int, nargs="*", default=[],
                    help="(d) decode experts: live slots to time grouped_mm against the Triton kernels at (e.g. 16 128 256)")
    ap.add_argument("--decode-layers", type=int, default=16, help="(d) experts layers in the captured step")
    ap.add_argument("--decode-configs", nargs="*", default=["64x128x4x3", "32x128x4x3", "128x128x4x3", "64x64x4x4",
                                                           "64x256x4x3", "128x64x8x4", "32x256x2x4", "64x128x4x3x16",
                                                           "64x128x4x3x64"],
                    help="(d) Triton tile settings BLOCK_N x BLOCK_K x warps x stages [x BLOCK_M, else block_m_for]")
    ap.add_argument("--only-decode", action="store_true", help="run only section (d)")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write JSON to PATH ('-': stdout only)")
    args = ap.parse_args(argv)
    if args.only_decode:
        args.layer_backends, args.model_backends = [], []
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU")
    import transformers

    ok, reason = megablocks_status()
    mb = "unavailable: " + reason
    if ok:
        import megablocks

        mb = getattr(megablocks, "__version__", "ok")
    else:
        args.layer_backends = [b for b in args.layer_backends if not b.startswith("megablocks")]
        args.model_backends = [b for b in args.model_backends if not b.startswith("megablocks")]
        args.profile = [b for b in args.profile if not b.startswith("megablocks")]
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(0), torch=torch.__version__,
               transformers=transformers.__version__, megablocks=mb)
    if args.layer_backends:
        bench_layer(args, out)
    torch.cuda.empty_cache()
    if args.model_backends:
        bench_model(args, out)
    if args.decode_tokens:
        bench_decode(args, out)
    if args.json != "-":
        print(markdown(out))
    if args.json:
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
