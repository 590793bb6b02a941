"""MegaBlocks experts vs transformers' grouped_mm on CUDA (`pytest -m gpu`; skipped without CUDA/MegaBlocks)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from r1lightning.moe import apply_moe_backend, experts_modules, megablocks_status
from r1lightning.moe import megablocks_experts as mbe
from r1lightning.moe.tiny import tiny_moe_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not megablocks_status()[0], reason=f"megablocks: {megablocks_status()[1]}"),
]
ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def reference(experts, x, idx, w):
    """transformers' grouped_mm; its eager loop where torch's grouped_mm has no kernel for the dtype."""
    try:
        return grouped_mm_experts_forward(experts, x, idx, w)
    except (RuntimeError, NotImplementedError):
        return type(experts).forward.__wrapped__(experts, x, idx, w)


def routing(kind, experts, x, gen, block=None):
    E, T = experts.num_experts, x.shape[0]
    if kind == "router":  # the architecture's own routing (DeepSeek-V3: group-limited, biased)
        seen = []
        hook = experts.register_forward_pre_hook(lambda mod, args: seen.append(args))
        with torch.no_grad():
            block(x.view(1, T, -1))
        hook.remove()
        _, idx, w = seen[0]
        return idx.clone(), w.detach().float().clone()
    if kind == "uneven_empty":  # experts 0..2 crowded, 3..E-1 empty except one row on expert 3
        idx = torch.stack([torch.arange(3), torch.tensor([1, 2, 0])], 1).repeat(T // 3 + 1, 1)[:T]
        idx[0, 1] = 3
    elif kind == "single_token":
        idx = torch.randperm(E, generator=gen)[:2].unsqueeze(0)
    else:
        idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    return idx.cuda(), torch.rand(idx.shape, generator=gen).cuda()


def run(fn, experts, x, idx, w, dy):
    experts.zero_grad(set_to_none=True)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(experts, x, idx, w)
    (y.float() * dy).sum().backward()
    return [y, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


NAMES = ["out", "d_hidden", "d_routing_weights", "d_gate_up_proj", "d_down_proj"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute,pad", [(False, 128), (True, 128), (False, 0)])
@pytest.mark.parametrize("case", ["router", "uniform", "uneven_empty", "single_token"])
def test_experts_parity(arch, dtype, recompute, pad, case):
    model = tiny_moe_model(arch).cuda()
    model.set_experts_implementation("eager")  # only for capturing the router's choice below
    name, experts = next(iter(experts_modules(model)))
    block = model.get_submodule(name.rsplit(".", 1)[0])
    experts._r1l_recompute_activation, experts._r1l_pad_rows = recompute, pad
    gen = torch.Generator().manual_seed(0)
    T = 1 if case == "single_token" else 96
    x = torch.randn(T, experts.gate_up_proj.shape[-1], generator=gen).cuda()
    idx, w = routing(case, experts, x, gen, block)
    dy = torch.randn(x.shape, generator=gen).cuda()
    ref32 = run(reference, experts, x, idx, w, dy)  # fp32 reference on the same weights
    model.to(dtype)
    x, w = x.to(dtype), w.to(dtype)
    ref = run(reference, experts, x, idx, w, dy)
    got = run(mbe.megablocks_experts_forward, experts, x, idx, w, dy)
    for n, g, r, r32 in zip(NAMES, got, ref, ref32):
        assert g.dtype == r.dtype and g.shape == r.shape, n
        if dtype == torch.float32:
            assert rel(g, r) <= 1e-5, (n, rel(g, r))
        else:  # bf16: as close to the fp32 answer as transformers' own bf16 path is
            assert rel(g, r32) <= 1.5 * rel(r, r32) + 2e-3, (n, rel(g, r32), rel(r, r32))
    if case == "uneven_empty":
        assert got[3][4:].abs().max() == 0 and got[4][4:].abs().max() == 0  # empty experts: zero grads


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("case", ["uniform", "uneven_empty", "single_token"])
def test_sync_free_kernels_match_megablocks(arch, recompute, case):
    """`megablocks_kernels: torch` (no host wait: device-side routing, torch._grouped_mm) against
    MegaBlocks' kernels, bf16: both as close to the fp32 answer; empty experts' weight gradients zero."""
    model = tiny_moe_model(arch).cuda()
    experts = next(m for _, m in experts_modules(model))
    experts._r1l_recompute_activation = recompute
    gen = torch.Generator().manual_seed(3)
    T = 1 if case == "single_token" else 96
    x = torch.randn(T, experts.gate_up_proj.shape[-1], generator=gen).cuda()
    idx, w = routing(case, experts, x, gen)
    dy = torch.randn(x.shape, generator=gen).cuda()
    ref32 = run(reference, experts, x, idx, w, dy)
    model.to(torch.bfloat16)
    x, w = x.bfloat16(), w.bfloat16()
    got = {}
    for kernels in ("megablocks", "torch"):
        experts._r1l_kernels = kernels
        got[kernels] = run(mbe.megablocks_experts_forward, experts, x, idx, w, dy)
    for n, g, r, r32 in zip(NAMES, got["torch"], got["megablocks"], ref32):
        assert g.dtype == r.dtype and g.shape == r.shape, n
        assert rel(g, r32) <= 1.5 * rel(r, r32) + 2e-3, (n, rel(g, r32), rel(r, r32))
    if case == "uneven_empty":
        assert got["torch"][3][4:].abs().max() == 0 and got["torch"][4][4:].abs().max() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_fused_and_unfused_gate_agree(fused):
    model = tiny_moe_model("qwen3_moe", dtype=torch.bfloat16).cuda()
    experts = next(m for _, m in experts_modules(model))
    experts._r1l_fused_gate = fused
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=gen).cuda().bfloat16()
    idx, w = routing("uniform", experts, x, gen)
    dy = torch.randn(x.shape, generator=gen).cuda()
    ref = run(reference, experts, x, idx, w.bfloat16(), dy)
    got = run(mbe.megablocks_experts_forward, experts, x, idx, w.bfloat16(), dy)
    for n, g, r in zip(NAMES, got, ref):
        assert rel(g, r) < 1.5e-2, (n, rel(g, r))


@pytest.mark.parametrize("arch", ARCHS)
def test_model_parity_and_aux_loss(arch):
    """Whole model. fp32 (2 layers): logits, grads, aux_loss match grouped_mm and eager. bf16 (1 layer,
    so both backends see the same router input): same router logits, same top-k, same aux_loss,
    logits within bf16 tolerance. (Deeper bf16 models can flip near-tied routes after layer 0.)"""
    ids = torch.randint(1, 128, (2, 48), generator=torch.Generator().manual_seed(5)).cuda()
    res = {}
    for impl in ("grouped_mm", "megablocks", "eager"):
        model = tiny_moe_model(arch).cuda()
        assert apply_moe_backend(model, impl) == impl
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        res[impl] = out, grads
    (g, gg), (m, mg), (e, eg) = res["grouped_mm"], res["megablocks"], res["eager"]
    assert rel(m.logits, g.logits) <= 1e-5 and rel(mg, gg) <= 1e-5 and rel(eg, gg) <= 1e-5
    aux = [getattr(o, "aux_loss", None) for o in (g, m, e)]
    if arch != "deepseek_v3":  # DeepSeek-V3 balances with a routing bias, no aux loss
        assert abs(aux[1].item() - aux[0].item()) <= 1e-6 * aux[0].item()
        assert abs(aux[2].item() - aux[0].item()) <= 1e-6 * aux[0].item()
    b16 = {}
    for impl in ("grouped_mm", "megablocks"):
        model = tiny_moe_model(arch, dtype=torch.bfloat16, num_hidden_layers=1).cuda()
        apply_moe_backend(model, impl)
        b16[impl] = model(input_ids=ids, labels=ids)
    g16, m16 = b16["grouped_mm"], b16["megablocks"]
    assert rel(m16.logits, g16.logits) < 2e-2
    if getattr(g16, "router_logits", None) is not None:
        assert torch.equal(m16.router_logits[0], g16.router_logits[0])
        top = [o.router_logits[0].float().topk(2, dim=-1).indices for o in (g16, m16)]
        assert torch.equal(top[0], top[1])
        if getattr(g16, "aux_loss", None) is not None:
            assert torch.equal(m16.aux_loss, g16.aux_loss)


def test_autocast_fp32_master_weights():
    model = tiny_moe_model("olmoe").cuda()
    experts = next(m for _, m in experts_modules(model))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 64, generator=gen).cuda()
    idx, w = routing("uniform", experts, x, gen)
    dy = torch.randn(x.shape, generator=gen).cuda()
    ref = run(reference, experts, x, idx, w, dy)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(mbe.megablocks_experts_forward, experts, x, idx, w, dy)
    assert got[0].dtype == torch.float32 and experts.gate_up_proj.grad.dtype == torch.float32
    for n, g, r in zip(NAMES, got, ref):
        assert rel(g, r) < 2e-2, (n, rel(g, r))


def test_cpu_built_model_runs_megablocks_after_moving(monkeypatch):
    calls = []
    real = mbe.experts_forward
    monkeypatch.setattr(mbe, "experts_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_moe_model("mixtral")  # built on CPU, like Lightning does
    assert apply_moe_backend(model, "auto") == "megablocks"
    ids = torch.randint(1, 128, (1, 16))
    model(input_ids=ids)
    assert not calls  # on CPU: transformers' grouped_mm
    model.cuda()(input_ids=ids.cuda())
    assert len(calls) == model.config.num_hidden_layers


def test_recompute_saves_one_activation_per_layer():
    """Memory kept for backward drops by exactly the gated activation a = [rows, F] (bf16), rows being
    T*K with each expert's share rounded up to PAD_ROWS."""
    torch.manual_seed(0)
    model = tiny_moe_model("olmoe", dtype=torch.bfloat16, hidden_size=512, intermediate_size=256, num_experts=16,
                           num_experts_per_tok=4).cuda()
    experts = next(m for _, m in experts_modules(model))
    T, K, F = 4096, 4, 256
    x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:K] for _ in range(T)]).cuda()
    w = torch.rand(T, K, device="cuda", dtype=torch.bfloat16)
    kept = {}
    for recompute in (False, True, False, True):  # first pass: cuBLAS workspace, Triton autotuning
        experts._r1l_recompute_activation = recompute
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = mbe.megablocks_experts_forward(experts, x, idx, w)
        kept[recompute] = torch.cuda.memory_allocated() - base
        y.sum().backward()
        del y
    rows = sum(-(-int(c) // mbe.PAD_ROWS) * mbe.PAD_ROWS for c in torch.bincount(idx.flatten(), minlength=16))
    assert rows >= T * K
    assert kept[False] - kept[True] == rows * F * 2
