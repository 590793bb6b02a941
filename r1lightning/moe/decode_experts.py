"""Expert FFNs for decode steps: no host synchronisation, so a decode step can be captured in a CUDA graph.

MegaBlocks' grouped GEMM (and transformers' loop fallbacks) want per-expert sizes on the host. At
decode there are only T = batch tokens, and two ways that keep every size on the device:

* `grouped_mm`: sort the T·k (token, expert) rows by expert, per-expert offsets from a device-side
  count + cumsum, `torch._grouped_mm` for gate/up and down. Each active expert's weights are read
  once, so the bytes read per step are those of the experts in use (all of them at batch 64, top-8
  of 64 experts).
* `gather`: gather the k experts' weights for every token and run batched mat-vecs. Reads T·k
  weight matrices (duplicates included) and writes the gathered copy. Measured on the OLMoE-shaped
  model at batch 4 (32 rows): 7.80 ms per decode step against grouped_mm's 5.71 (docs/benchmarks.md),
  so `auto` takes it only where `_grouped_mm` cannot run (fp32 on CUDA, unaligned strides).
* `triton`: `decode_kernel.py`, a grouped GEMM whose tiles are as small as decode's per-expert row
  counts, with the SwiGLU and the routing weight fused in. SiLU-gated experts without biases only.
  On one H200 (16 OLMoE expert layers in one CUDA graph, bf16; docs/benchmarks.md, 2026-12-01):
  3.37 / 3.76 / 5.53 ms at 64 / 128 / 256 slots against grouped_mm's 5.89 / 5.98 / 6.26, so `auto`
  takes it on CUDA in bf16 wherever it can run.

Registered with transformers' experts interface as `r1l_decode`; the rollout engine switches the
model to it around its decode loop and back (prefill keeps the policy's own implementation).
"""

from __future__ import annotations

import torch

from r1lightning.moe import decode_kernel
from r1lightning.moe.backend import triton_available
from r1lightning.moe.megablocks_experts import is_default_silu_gate

NAME = "r1l_decode"
MODES = ("auto", "grouped_mm", "gather", "triton")


def _grouped_mm_fn():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(*tensors) -> bool:
    # _grouped_mm needs 16-byte aligned strides and base pointers (CPU and CUDA kernels alike).
    # Under torch.compile pointers are unknown at trace time: the strides decide (inductor's
    # buffers and the allocator's are aligned; a view at an odd offset is what the check catches).
    compiling = torch.compiler.is_compiling()
    for t in tensors:
        if not compiling and t.data_ptr() % 16:
            return False
        for s, n in zip(t.stride(), t.shape):
            if n > 1 and s != 1 and (s * t.element_size()) % 16:
                return False
    return True


def choose_mode(module, hidden_states: torch.Tensor) -> str:
    mode = getattr(module, "_r1l_decode_mode", "auto")
    if mode != "auto":
        return mode
    w1 = module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
    # bf16 only on CUDA, and under torch.compile on any device (its shape checks are CUDA's).
    bf16_only = w1.is_cuda or torch.compiler.is_compiling()
    if _grouped_mm_fn() is None or (bf16_only and w1.dtype != torch.bfloat16):
        return "gather"
    if not _aligned(w1, module.down_proj) or hidden_states.shape[-1] * w1.element_size() % 16:
        return "gather"
    # Under compile the check is not traced: `set_decode_mode(model, "auto")` settled it eagerly.
    if not torch.compiler.is_compiling() and auto_takes_triton(module):
        return "triton"
    return "grouped_mm"


def auto_takes_triton(module) -> bool:
    """`auto`'s choice of the kernel: bf16 experts on CUDA that it can run."""
    w = module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
    return w.is_cuda and w.dtype == torch.bfloat16 and triton_unsupported(module) is None


def check_triton(module, name: str) -> None:
    """A one-line error when the `triton` path cannot run this experts module (`name`: how to call it)."""
    reason = triton_unsupported(module)
    if reason:
        raise ValueError(f"decode_experts: triton cannot run {name}: {reason}; use grouped_mm")


def triton_unsupported(module) -> str | None:
    """Why the `triton` path cannot run this experts module (None when it can)."""
    if not getattr(module, "has_gate", True) or not is_default_silu_gate(module):
        return "its experts are not gate|up SiLU-gated (SwiGLU)"
    if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
        return "its experts have biases or a post-expert norm"
    if module.gate_up_proj.is_cuda and not triton_available():  # the reference path waits on the host: no graphs
        return "Triton is not installed"
    inner = 1 if getattr(module, "is_transposed", False) else -1  # stored [E, in, out] when transposed
    if not decode_kernel.supports(module.gate_up_proj.shape[inner], module.down_proj.shape[inner]):
        return "its hidden or expert FFN size is below 16"
    return None


def _proj(x, w, transposed):
    return x @ w if transposed else x @ w.transpose(-2, -1)


def _gate(module, h):
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def decode_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """[T, H], [T, K], [T, K] -> [T, H]; same contract as transformers' experts functions."""
    T, K = top_k_index.shape
    H = hidden_states.shape[-1]
    # Flags read with defaults: older transformers releases set fewer of them on experts modules.
    has_gate, has_bias = getattr(self, "has_gate", True), getattr(self, "has_bias", False)
    transposed, post_norm = getattr(self, "is_transposed", False), getattr(self, "has_post_expert_norm", False)
    mode = choose_mode(self, hidden_states)
    if mode == "triton":
        if not torch.compiler.is_compiling():  # checked eagerly (set_decode_mode too), not traced: it may import Triton
            check_triton(self, type(self).__name__)
        x = hidden_states.to(self.gate_up_proj.dtype)
        out = decode_kernel.moe_decode(x, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights, transposed)
        return out.to(hidden_states.dtype)
    w_in = self.gate_up_proj if has_gate else self.up_proj
    b_in = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    w_out, b_out = self.down_proj, (self.down_proj_bias if has_bias else None)
    x = hidden_states.to(w_in.dtype)
    expert_ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1, 1)

    if mode == "gather":
        rows = x.repeat_interleave(K, dim=0).unsqueeze(1)  # [S, 1, H]
        h = _proj(rows, w_in[expert_ids], transposed).squeeze(1)  # [S, 2F]
        if b_in is not None:
            h = h + b_in[expert_ids]
        a = _gate(self, h) if has_gate else self.act_fn(h)
        y = _proj(a.unsqueeze(1), w_out[expert_ids], transposed).squeeze(1)  # [S, H]
        if b_out is not None:
            y = y + b_out[expert_ids]
        if post_norm:
            y = self.post_expert_norm(y)
        y = y * weights.to(y.dtype)
        return y.view(T, K, H).sum(dim=1).to(hidden_states.dtype)

    gmm = _grouped_mm_fn()
    order = torch.argsort(expert_ids, stable=True)  # rows in expert order
    sorted_ids = expert_ids[order]
    # scatter_add into a fixed-size count keeps the shape static (bincount's size would need a sync).
    counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, sorted_ids.to(torch.int64), torch.ones_like(sorted_ids, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // K]
    w1 = w_in if transposed else w_in.transpose(-2, -1)  # [E, H, 2F]
    h = gmm(xs, w1, offs=offs)
    if b_in is not None:
        h = h + b_in[sorted_ids]
    a = _gate(self, h) if has_gate else self.act_fn(h)
    w2 = w_out if transposed else w_out.transpose(-2, -1)  # [E, F, H]
    y = gmm(a.to(w2.dtype), w2, offs=offs)
    if b_out is not None:
        y = y + b_out[sorted_ids]
    if post_norm:
        y = self.post_expert_norm(y)
    y = y * weights[order].to(y.dtype)
    out = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, k) order
    return out.view(T, K, H).sum(dim=1).to(hidden_states.dtype)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, decode_experts_forward)


def set_decode_mode(model: torch.nn.Module, mode: str) -> None:
    """Force `grouped_mm`, `gather` or `triton` on every experts module (the engines, benchmarks, tests);
    `auto` decides per call, except that bf16 CUDA experts the kernel can run are set to `triton` here.
    `triton` is checked here, before any step runs, naming the module."""
    if mode not in MODES:
        raise ValueError(f"decode experts mode {mode!r} is not one of {', '.join(MODES)}")
    from r1lightning.moe import experts_modules

    for name, m in experts_modules(model):
        if mode == "triton":
            check_triton(m, f"{name} ({type(m).__name__})")
        # `auto`'s kernel choice settled here, outside any compiled region
        m._r1l_decode_mode = "triton" if mode == "auto" and auto_takes_triton(m) else mode
