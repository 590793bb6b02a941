"""CPU tests of the MoE backend switch and of the MegaBlocks glue (with plain-torch stand-in kernels)."""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from r1lightning.moe import apply_moe_backend, backend as moe_backend, experts_modules
from r1lightning.moe.megablocks_experts import (
    SyncFreeKernels, TorchKernels, experts_forward, loop_gmm, max_tokens, megablocks_experts_forward, torch_gmm,
)
from r1lightning.moe.tiny import TINY_CONFIGS, tiny_moe_model
from tests.triton_cpu import needs_triton, run_interpreted

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def mb_available(monkeypatch):
    """Pretend MegaBlocks is installed and a GPU is visible (the CPU path is then exercised)."""
    monkeypatch.setattr(moe_backend, "megablocks_status", lambda: (True, "ok"))


def gpt_oss_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg)


# ---------------------------------------------------------------------------------------------- switch


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'dmoe' is not one of auto, megablocks, grouped_mm, eager"):
        apply_moe_backend(tiny_moe_model("olmoe"), "dmoe")
    with pytest.raises(ValueError, match=r"policy.megablocks_kernels: 'cutlass' is not one of megablocks, torch"):
        apply_moe_backend(tiny_moe_model("olmoe"), "megablocks", kernels="cutlass")


def test_status_on_this_machine_gives_a_reason():
    ok, reason = moe_backend.megablocks_status()
    if not torch.cuda.is_available():
        assert not ok and reason.startswith(("not installed", "no CUDA device"))


def test_auto_picks_transformers_default_without_megablocks(monkeypatch, caplog):
    monkeypatch.setattr(moe_backend, "megablocks_status", lambda: (False, "no CUDA device"))
    model = tiny_moe_model("qwen3_moe")
    with caplog.at_level(logging.WARNING):
        assert apply_moe_backend(model, "auto") == "grouped_mm"
    assert model.config._experts_implementation == "grouped_mm"
    assert not caplog.records  # auto falling back is expected, not a warning


def test_megablocks_requested_but_unavailable_falls_back_with_reason(monkeypatch, caplog):
    monkeypatch.setattr(moe_backend, "megablocks_status", lambda: (False, "not installed (No module named 'megablocks')"))
    model = tiny_moe_model("olmoe")
    with caplog.at_level(logging.WARNING):
        assert apply_moe_backend(model, "megablocks") == "grouped_mm"
    assert model.config._experts_implementation == "grouped_mm"
    assert [r.getMessage() for r in caplog.records] == [
        "moe_backend=megablocks unavailable: not installed (No module named 'megablocks'); using grouped_mm"]


def test_explicit_backends_and_dense_models():
    model = tiny_moe_model("mixtral")
    assert apply_moe_backend(model, "eager") == "eager"
    assert model.config._experts_implementation == "eager"
    assert apply_moe_backend(model, "grouped_mm") == "grouped_mm"
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    assert apply_moe_backend(dense, "auto") == "dense"


def test_megablocks_registered_dispatches_to_grouped_mm_on_cpu(mb_available):
    """A model built on CPU with `megablocks` runs transformers' grouped_mm until it sits on CUDA."""
    ref = tiny_moe_model("olmoe")
    model = tiny_moe_model("olmoe")
    assert apply_moe_backend(model, "auto", recompute_activation=True) == "megablocks"
    assert model.config._experts_implementation == "megablocks"
    assert all(m._r1l_recompute_activation for _, m in experts_modules(model))
    apply_moe_backend(ref, "grouped_mm")
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_unsupported_experts_fall_back_with_reason(mb_available, caplog):
    model = gpt_oss_model()
    with caplog.at_level(logging.WARNING):
        assert apply_moe_backend(model, "megablocks") == "grouped_mm"
    assert caplog.records[0].getMessage() == (
        "moe_backend=megablocks unavailable: GptOssExperts: biased experts, interleaved gate/up, "
        "transposed weights; using grouped_mm")


def test_per_module_fallback_inside_registered_function():
    model = gpt_oss_model()
    experts = model.model.layers[0].mlp.experts
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(6, 64)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    torch.testing.assert_close(megablocks_experts_forward(experts, x, idx, w),
                               grouped_mm_experts_forward(experts, x, idx, w), rtol=0, atol=0)


def test_policy_reports_backend_in_effect(monkeypatch, caplog):
    from r1lightning.policy import Policy

    monkeypatch.setattr(moe_backend, "megablocks_status", lambda: (False, "no CUDA device"))
    cfg = {k: v for k, v in TINY_CONFIGS["qwen3_moe"].items() if k not in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
    policy = Policy(config=cfg, tokenizer="char", moe_backend="megablocks", moe_recompute_activation=True)
    with caplog.at_level(logging.WARNING):
        policy.build()
    assert policy.moe_backend_in_effect == "grouped_mm"
    assert any("moe_backend=megablocks unavailable: no CUDA device; using grouped_mm" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_grouped_mm_agree_with_aux_loss(arch):
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("eager", "grouped_mm"):
        model = tiny_moe_model(arch)
        apply_moe_backend(model, impl)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = out, grads
    (e, ge), (g, gg) = results["eager"], results["grouped_mm"]
    assert rel(g.logits, e.logits) < 1e-5
    assert abs(g.loss.item() - e.loss.item()) < 1e-5 * abs(e.loss.item())
    assert rel(gg, ge) < 1e-5
    if arch != "deepseek_v3":  # DeepSeek-V3 balances with a routing bias, it has no aux loss
        assert e.aux_loss is not None and e.aux_loss.item() > 0
        assert abs(g.aux_loss.item() - e.aux_loss.item()) <= 1e-6 * e.aux_loss.item()


def routing_cases(num_experts, top_k, gen):
    """(name, top_k_index) covering balanced, uneven with empty experts, one token, one hot expert."""
    t = 40
    uniform = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(t)])
    skew = torch.stack([torch.tensor([i % 3, 3 + (i % 2)])[:top_k] for i in range(t)])  # experts 5.. empty
    single = torch.randperm(num_experts, generator=gen)[:top_k].unsqueeze(0)
    hot = torch.stack([torch.tensor([7, (i % 2)])[:top_k] for i in range(9)])
    return [("uniform", uniform), ("uneven_empty", skew), ("single_token", single), ("hot_expert", hot)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_grouped_gemm_keeps_the_loop_contract(dtype):
    """`torch_gmm` equals one matmul per expert in all three uses, with empty experts first, inside, last."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([0, 8, 0, 24, 16, 0])
    S, K, N = int(sizes.sum()), 16, 32
    a = torch.randn(S, K, generator=gen).to(dtype)
    w = torch.randn(len(sizes), N, K, generator=gen).to(dtype)  # [E, N, K], as the experts' weights
    dy = torch.randn(S, N, generator=gen).to(dtype)
    assert torch.equal(torch_gmm(a, w, sizes, trans_b=True), loop_gmm(a, w, sizes, trans_b=True))
    assert torch.equal(torch_gmm(dy, w, sizes), loop_gmm(dy, w, sizes))
    got = torch_gmm(dy, a, sizes, trans_a=True)  # [E, N, K] weight gradients
    assert got.shape == (len(sizes), N, K) and torch.equal(got, loop_gmm(dy, a, sizes, trans_a=True))
    assert got[[0, 2, 5]].abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recompute,pad", [(False, 0), (True, 0), (False, 8), (True, 8)])
@pytest.mark.parametrize("kernels", [TorchKernels, SyncFreeKernels])
def test_megablocks_glue_matches_grouped_mm(arch, recompute, pad, kernels):
    """Index bookkeeping, autograd and recompute of the MegaBlocks path, with torch stand-in kernels
    (per-expert matmuls from host sizes), and with `megablocks_kernels: torch`'s kernels themselves."""
    model = tiny_moe_model(arch)
    experts = next(m for _, m in experts_modules(model))
    experts._r1l_recompute_activation = recompute
    gen = torch.Generator().manual_seed(0)
    for case, idx in routing_cases(experts.num_experts, 2, gen):
        x = torch.randn(idx.shape[0], experts.gate_up_proj.shape[-1], generator=gen, requires_grad=True)
        w = torch.rand(idx.shape, generator=gen, requires_grad=True)
        dy = torch.randn(x.shape, generator=gen)
        got = []
        for fn in (grouped_mm_experts_forward, lambda *a: experts_forward(*a, kernels=kernels(), fused_gate=False, pad_rows=pad)):
            experts.zero_grad()
            x.grad = w.grad = None
            y = fn(experts, x, idx, w)
            (y * dy).sum().backward()
            got.append([y, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
        for name, a, b in zip(["out", "dx", "dw_route", "dgate_up", "ddown"], got[1], got[0]):
            assert rel(a, b) <= 1e-5, (case, name, rel(a, b))
        if case == "uneven_empty":
            assert got[1][3][5:].abs().max() == 0 and got[1][4][5:].abs().max() == 0


def test_int32_kernels_take_token_chunks_below_the_limit():
    """MegaBlocks' gather/scatter index `row * columns` in int32: a larger call is split into token
    chunks whose padded rows stay below 2^31 elements, with the same outputs and gradients."""
    # OLMoE: 131,072 tokens (a reference micro-batch) x top-8 + padding, 2,048 wide, passed 2^31
    assert max_tokens(8, 64, 2048, 128) == ((2**31 - 1) // 2048 - 64 * 128) // 8 == 130_047
    assert (130_047 * 8 + 64 * 127) * 2048 < 2**31 <= (131_072 * 8) * 2048 + 64 * 127 * 2048

    class Chunked(TorchKernels):
        max_elements = None  # set below: room for 7 tokens
        calls: list = []

        def route(self, expert_ids, num_experts, pad):
            self.calls.append(expert_ids.numel())
            return super().route(expert_ids, num_experts, pad)

    model = tiny_moe_model("olmoe")
    experts = next(m for _, m in experts_modules(model))
    cols = max(experts.gate_up_proj.shape[-2], experts.gate_up_proj.shape[-1])
    Chunked.max_elements = cols * (experts.num_experts * 2 + 2 * 7)  # room for 7 tokens of top-2 at pad 2
    gen = torch.Generator().manual_seed(1)
    _, idx = routing_cases(experts.num_experts, 2, gen)[0]  # 40 tokens
    x = torch.randn(idx.shape[0], experts.gate_up_proj.shape[-1], generator=gen, requires_grad=True)
    w = torch.rand(idx.shape, generator=gen, requires_grad=True)
    got = []
    for kernels in (TorchKernels(), Chunked()):
        experts.zero_grad()
        x.grad = w.grad = None
        y = experts_forward(experts, x, idx, w, kernels=kernels, fused_gate=False, pad_rows=2)
        (y * y).sum().backward()
        got.append([y, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    assert Chunked.calls == [14] * 5 + [10]  # 40 tokens in chunks of 7: T*k pairs a call
    for a, b in zip(got[1], got[0]):
        assert rel(a, b) <= 1e-6


def test_sync_free_kernels_never_read_a_value_on_the_host(monkeypatch):
    """Forward and backward of the experts with `megablocks_kernels: torch` read no tensor value on the
    host (on a GPU each such read waits for the queue)."""
    model = tiny_moe_model("olmoe")
    experts = next(m for _, m in experts_modules(model))
    gen = torch.Generator().manual_seed(4)
    _, idx = routing_cases(experts.num_experts, 2, gen)[1]  # uneven, with empty experts
    x = torch.randn(idx.shape[0], experts.gate_up_proj.shape[-1], generator=gen, requires_grad=True)
    w = torch.rand(idx.shape, generator=gen, requires_grad=True)
    reads = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: reads.append(_n) or _r(self, *a, **k))
    y = experts_forward(experts, x, idx, w, kernels=SyncFreeKernels(), fused_gate=False, pad_rows=8)
    y.sum().backward()
    monkeypatch.undo()
    assert reads == [] and x.grad is not None and experts.gate_up_proj.grad is not None
    reads.clear()
    with monkeypatch.context() as m:  # the check itself can fail: the host-size kernels do read
        real = torch.Tensor.tolist
        m.setattr(torch.Tensor, "tolist", lambda self, *a, **k: reads.append("tolist") or real(self, *a, **k))
        experts_forward(experts, x, idx, w, kernels=TorchKernels(), fused_gate=False, pad_rows=8).sum().backward()
    assert reads


def test_megablocks_glue_bf16_and_autocast():
    model = tiny_moe_model("qwen3_moe")
    experts = next(m for _, m in experts_modules(model))
    gen = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(32)])
    x = torch.randn(32, 64, generator=gen)
    w = torch.rand(32, 2, generator=gen)
    ref = grouped_mm_experts_forward(experts, x, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts_forward(experts, x, idx, w, kernels=TorchKernels(), fused_gate=False)
    assert y.dtype == torch.float32 and rel(y, ref) < 2e-2


@needs_triton
def test_fused_swiglu_kernels_compile_for_hopper():
    # ahead of time for sm_90 (tests/triton_cpu.py), at the OLMoE expert FFN (F 1024: 2 x 512 columns a program)
    from r1lightning.moe.swiglu import _kernels
    from tests.triton_cpu import compile_for_hopper

    _, fwd, bwd = _kernels()
    types = dict(h_ptr="*bf16", a_ptr="*bf16", da_ptr="*bf16", dh_ptr="*bf16", rows="i32", F="i32")
    aligned = [name for name in types if name != "rows"]
    assert compile_for_hopper(fwd, types, dict(BLOCK_R=4, BLOCK_C=512), aligned).asm["cubin"]
    for write_a in (True, False):
        assert compile_for_hopper(bwd, types, dict(WRITE_A=write_a, BLOCK_R=4, BLOCK_C=512), aligned).asm["cubin"]


@needs_triton
def test_fused_swiglu_in_triton_interpreter():
    """The Triton SwiGLU kernels, run by Triton's CPU interpreter, against torch's silu(g) * u."""
    code = textwrap.dedent("""
        import torch
        from r1lightning.moe.swiglu import swiglu_forward, swiglu_backward
        torch.manual_seed(0)
        for S, F in ((7, 24), (3, 600), (0, 8)):
            h = torch.randn(S, 2 * F, requires_grad=True)
            g, u = h.chunk(2, -1)
            a_ref = torch.nn.functional.silu(g) * u
            da = torch.randn(S, F)
            a_ref.backward(da)
            dh, a2 = swiglu_backward(h.detach(), da, True)
            torch.testing.assert_close(swiglu_forward(h.detach()), a_ref.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a2, a_ref.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(dh, h.grad, rtol=1e-6, atol=1e-6)
            assert swiglu_backward(h.detach(), da, False)[1] is None
        print("ok")
    """)
    run_interpreted(code)
