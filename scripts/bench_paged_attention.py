#!/usr/bin/env python3
"""Decode attention over the paged KV pool, alone: the bytes a long completion's decode step reads.

At 4,096 completion tokens on the OLMoE shape about half of a decode step is this read (docs/benchmarks.md,
session 13: 8.26 of 15.2 ms). Times `--layers` layers of `paged_attention` (each its
own K/V pools, so nothing stays in L2) back to back in one CUDA graph, for `--slots` slots of
`--length` tokens each, with the pool in the compute dtype (bf16) and in fp8 (`kv_dtype: fp8`):
median ms over `--iters` replays (min-max), GB/s = the pool bytes the slots attend to / time (the
H200 copies ~4.3 TB/s), and each output's error against the fp32 reference over the bf16 pool.
`--launch` compares the kernel's launch settings (WARPSxSTAGES; `auto`: `paged_attention.launch_config`).

    python3 scripts/bench_paged_attention.py                                # 128 slots x 2,176 tokens, 16 layers
    python3 scripts/bench_paged_attention.py --length 1088 4224 --json out.json   # 4,224: ~106 GB of pools
    python3 scripts/bench_paged_attention.py --launch auto 4x3 4x5 8x5            # launch settings, each pool
    python3 scripts/bench_paged_attention.py --device cpu --slots 4 --length 64 --layers 2 --heads 2 --iters 2  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

from r1lightning.rollout import paged_attention as pa


def timed(fn, device, warmup: int, iters: int) -> list[float]:
    """ms per call; on CUDA each call is one replay of a graph holding every layer."""
    if device != "cuda":  # the CPU smoke run: wall time
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return times
    from cuda_timing import time_graph

    return time_graph(fn, warmup, iters)[1]


def case(args, length: int, device: str) -> list[dict]:
    S, H, d, bs, L = args.slots, args.heads, args.head_dim, args.block_size, args.layers
    per_slot = -(-length // bs)
    g = torch.Generator(device).manual_seed(0)
    # each slot's blocks in a shuffled order, as a pool that has served many sequences
    table = torch.randperm(S * per_slot, generator=g, device=device).view(S, per_slot)
    lengths = torch.full((S,), length, dtype=torch.int32, device=device)
    q = torch.randn(S, H, d, generator=g, device=device).to(torch.bfloat16)
    pools = [(torch.randn(S * per_slot * bs, H, d, generator=g, device=device).to(torch.bfloat16),
              torch.randn(S * per_slot * bs, H, d, generator=g, device=device).to(torch.bfloat16)) for _ in range(L)]
    use_kernel = device == "cuda" and pa.kernel_supports(d, 1, bs)
    attend = pa.kernel if use_kernel else pa.reference
    want = pa.reference(q.float(), pools[-1][0].float(), pools[-1][1].float(), table, lengths, bs, d**-0.5)
    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kv = [(k.to(dtype), v.to(dtype)) for k, v in pools] if dtype != torch.bfloat16 else pools
        size = torch.empty((), dtype=dtype).element_size()
        read = 2 * L * S * length * H * d * size
        for launch in args.launch if use_kernel else ["auto"]:
            warps, stages = parse_launch(launch) or pa.launch_config(size, bs, d)
            opts = {"num_warps": warps, "num_stages": stages} if use_kernel else {}
            fn = lambda kv=kv, opts=opts: [attend(q, k, v, table, lengths, bs, d**-0.5, **opts) for k, v in kv]  # noqa: E731
            got = fn()[-1].float()
            times = timed(fn, device, args.warmup, args.iters)
            med = statistics.median(times)
            rows.append(dict(length=length, pool=name, path="kernel" if use_kernel else "reference",
                             launch=f"{warps}x{stages}{' (auto)' if launch == 'auto' else ''}" if use_kernel else "-",
                             median_ms=med, min_ms=min(times), max_ms=max(times), gb_read=read / 1e9,
                             gb_per_s=read / (med / 1e3) / 1e9, rel_err_vs_fp32=((got - want).norm() / want.norm()).item()))
            print(json.dumps(rows[-1]), flush=True)
        del kv
    del pools
    return rows


def parse_launch(text: str) -> tuple[int, int] | None:
    """`WARPSxSTAGES` (`4x5`) -> (4, 5); `auto` -> None (the kernel's `launch_config`)."""
    if text == "auto":
        return None
    warps, _, stages = text.partition("x")
    if not (warps.isdigit() and stages.isdigit()):
        raise SystemExit(f"--launch {text!r}: expected auto or WARPSxSTAGES, e.g. 4x5")
    return int(warps), int(stages)


def markdown(out) -> str:
    a = out["args"]
    lines = [f"{out['date']}, {out['device']}, torch {out['torch']}: {a['layers']} layers in one graph, {a['slots']} slots, "
             f"{a['heads']} KV heads x {a['head_dim']}, blocks of {a['block_size']}", "",
             "| tokens a slot | pool | path | warps x stages | ms (min-max) | GB read | GB/s | rel. err. vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['length']:,} | {r['pool']} | {r['path']} | {r['launch']} | {r['median_ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f}) | "
                     f"{r['gb_read']:.1f} | {r['gb_per_s']:,.0f} | {r['rel_err_vs_fp32']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--length", type=int, nargs="+", default=[2176], help="tokens each slot attends to (2,176: the "
                    "mean over a 128 + 4,096-token sequence's decode)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16, help="KV heads (OLMoE: 16, no grouping)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--launch", nargs="+", default=["auto"], metavar="WARPSxSTAGES",
                    help="kernel launch settings to time for each pool (auto: paged_attention.launch_config)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", torch=torch.__version__,
               args=vars(args), rows=[])
    for length in args.length:
        out["rows"] += case(args, length, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
