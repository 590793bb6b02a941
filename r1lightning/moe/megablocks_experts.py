"""Expert computation through MegaBlocks' permutation kernels and grouped_gemm, on transformers' weights.

Registered as transformers experts implementation `megablocks`. transformers still owns the router
(so load-balancing / z-losses, DeepSeek-V3 group routing, Qwen2-MoE's shared expert are untouched)
and the parameters (`gate_up_proj` [E, 2F, H], `down_proj` [E, H, F]: checkpoints stay in
transformers format). One call:

    sort expert ids (radix) -> histogram -> inclusive cumsum (bins) -> tokens per expert to host
    gather rows into expert order, each expert's rows padded to a multiple of PAD_ROWS
    -> grouped GEMM gate_up (trans_b) -> gated activation (fused SwiGLU in Triton)
    -> grouped GEMM down (trans_b) -> scatter back, scaled by routing weights, summed over top-k

grouped_gemm runs bf16 only; other dtypes keep the same permutation kernels and use one cuBLAS
matmul per expert (a correctness path, not a fast one).
"""

from __future__ import annotations

import torch

NAME = "megablocks"
# Each expert's rows are padded to a multiple of this (zero rows; MegaBlocks' padded gather/scatter),
# so grouped_gemm's per-expert cuBLAS GEMMs see a small, repeating set of shapes. Measured on the
# OLMoE-shaped training step (docs/benchmarks.md): 279 ms/step padded, 621 ms unpadded; the layer
# alone pays 0.65 ms for the extra rows. Why unpadded shapes hurt the step that much is not profiled.
PAD_ROWS = 128
# MegaBlocks' gather/scatter kernels address a row as `row * columns` in int32: a call whose padded
# rows times the widest row (H, or 2F for the gate/up output) reach 2^31 reads and writes out of
# bounds. A 131,072-token reference micro-batch on the OLMoE shape (1.05 M rows × 2,048) did, as an
# illegal memory access (H200, 2026-12-01). Larger calls are split into token chunks below the limit.
INT32_ELEMENTS = 2**31 - 1


def unsupported_reason(module) -> str | None:
    """Why this experts module cannot take the MegaBlocks path (None when it can)."""
    why = []
    if not getattr(module, "has_gate", True):
        why.append("non-gated experts")
    if getattr(module, "has_bias", False):
        why.append("biased experts")
    if not getattr(module, "is_concatenated", True):
        why.append("interleaved gate/up")
    if getattr(module, "is_transposed", False):
        why.append("transposed weights")
    if getattr(module, "has_post_expert_norm", False):
        why.append("post-expert norm")
    if getattr(module, "_is_expert_parallel", False):
        why.append("expert parallel")
    return ", ".join(why) or None


# --------------------------------------------------------------------------------------------------
# Kernels. `MegaBlocksKernels` is the real thing; `TorchKernels` has the same contract in plain torch
# so the glue below (index bookkeeping, autograd, recompute) is tested on CPU too.


class Routing:
    """Where each (token, k) row goes: expert order, optionally each expert's rows padded up."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _round_up(n, pad):
    return (n + pad - 1) // pad * pad if pad > 1 else n


class MegaBlocksKernels:
    sizes_on_device = False  # grouped_gemm's cuBLAS path takes the per-expert sizes from the host
    max_elements = INT32_ELEMENTS  # its gather/scatter index in int32: see INT32_ELEMENTS

    def __init__(self):
        import grouped_gemm.backend as gg
        import megablocks.ops as ops

        self.ops, self.gg = ops, gg

    def route(self, expert_ids: torch.Tensor, num_experts: int, pad: int) -> Routing:
        end_bit = max(int(num_experts - 1).bit_length(), 1)
        bin_ids, indices = self.ops.sort(expert_ids, end_bit)
        counts = self.ops.histogram(expert_ids, num_experts)
        bins = self.ops.inclusive_cumsum(counts, 0).view(-1)
        padded_bins = self.ops.inclusive_cumsum(self.ops.round_up(counts, pad), 0).view(-1) if pad > 1 else None
        # grouped_gemm's cuBLAS path needs the sizes on the host. Queue the copy before the gather so
        # the one wait per layer (here, or inside padded_gather) drains the GPU queue only once.
        host = torch.empty(num_experts, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Routing(bin_ids=bin_ids, indices=indices, bins=bins, padded_bins=padded_bins, pad=pad,
                       host=host, ready=ready)

    def batch_sizes(self, r: Routing) -> torch.Tensor:
        r.ready.synchronize()
        return _round_up(r.host.to(torch.int64), r.pad)

    def gather(self, x, r: Routing, top_k):
        if r.padded_bins is None:
            return self.ops.gather(x, r.indices, r.bin_ids, r.bins, top_k)
        return self.ops.padded_gather(x, r.indices, r.bin_ids, r.bins, r.padded_bins, top_k)

    def scatter(self, y, r: Routing, weights, top_k):
        if r.padded_bins is None:
            return self.ops.scatter(y, r.indices, r.bin_ids, weights, r.bins, top_k)
        return self.ops.padded_scatter(y, r.indices, r.bin_ids, weights, r.bins, r.padded_bins, top_k)

    def gmm(self, a, b, batch_sizes, trans_a=False, trans_b=False):
        if a.dtype == torch.bfloat16:
            return self.gg.gmm(a, b, batch_sizes, trans_a=trans_a, trans_b=trans_b)
        return loop_gmm(a, b, batch_sizes, trans_a, trans_b)


class TorchKernels:
    """Reference kernels in plain torch (CPU tests of the glue; never used for speed)."""

    sizes_on_device = False
    max_elements = None  # no limit (a test sets one to exercise the token chunks)

    def route(self, expert_ids, num_experts, pad):
        bin_ids, indices = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids.long(), minlength=num_experts)
        padded = _round_up(counts, pad)
        # sorted row j of expert e lands at (padded start of e) + (j - start of e)
        starts = torch.cumsum(counts, 0) - counts
        pstarts = torch.cumsum(padded, 0) - padded
        e = bin_ids.long()
        dest = pstarts[e] + torch.arange(len(e)) - starts[e]
        return Routing(indices=indices, dest=dest, rows=int(padded.sum()), sizes=padded.to(torch.int64))

    def batch_sizes(self, r):
        return r.sizes

    def gather(self, x, r, top_k):
        out = x.new_zeros(r.rows, x.shape[1])
        return out.index_copy(0, r.dest, x[r.indices // top_k])

    def scatter(self, y, r, weights, top_k):
        scaled = y[r.dest] * weights[r.indices].unsqueeze(-1)
        out = torch.empty_like(scaled).index_copy(0, r.indices, scaled)
        return out.view(-1, top_k, y.shape[-1]).sum(dim=1)

    def gmm(self, a, b, batch_sizes, trans_a=False, trans_b=False):
        return loop_gmm(a, b, batch_sizes, trans_a, trans_b)


class SyncFreeKernels(TorchKernels):
    """The MegaBlocks layout (rows sorted by expert, each expert padded to `pad` rows) with no host
    wait: counts by scatter_add, the padded buffer sized by its bound T*K + E*(pad-1) rather than
    its exact size, and the GEMMs through `torch._grouped_mm` (one kernel for all experts, offsets
    on the device). MegaBlocks' path waits on the host once per layer in forward and once in
    backward (grouped_gemm's cuBLAS build takes host sizes and launches one GEMM per expert; the
    padded gather reads its size), which leaves the GPU idle while the host catches up; with small
    micro-batches (4,224 tokens: ~530 rows per expert) each GEMM is only a few microseconds.
    Rows past the last expert's are never read: the scatter and the gather's gradient read only
    the routed rows. `policy.megablocks_kernels: torch`; not yet timed against MegaBlocks."""

    sizes_on_device = True

    def route(self, expert_ids, num_experts, pad):
        n = expert_ids.shape[0]
        bin_ids, indices = torch.sort(expert_ids, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
        counts.scatter_add_(0, expert_ids.long(), torch.ones(n, dtype=torch.int64, device=expert_ids.device))
        padded = _round_up(counts, pad)
        starts, pstarts = torch.cumsum(counts, 0) - counts, torch.cumsum(padded, 0) - padded
        e = bin_ids.long()
        dest = pstarts[e] + torch.arange(n, device=e.device) - starts[e]
        rows = n + num_experts * (pad - 1) if pad > 1 else n
        return Routing(indices=indices, dest=dest, rows=rows, sizes=padded)

    # index_select rather than advanced indexing: its backward is an index_add, not a sort
    def gather(self, x, r, top_k):
        return x.new_zeros(r.rows, x.shape[1]).index_copy(0, r.dest, x.index_select(0, r.indices // top_k))

    def scatter(self, y, r, weights, top_k):
        scaled = y.index_select(0, r.dest) * weights.index_select(0, r.indices).unsqueeze(-1)
        out = torch.empty_like(scaled).index_copy(0, r.indices, scaled)  # indices: a permutation
        return out.view(-1, top_k, y.shape[-1]).sum(dim=1)

    def gmm(self, a, b, batch_sizes, trans_a=False, trans_b=False):
        if a.dtype == torch.bfloat16 or not a.is_cuda:  # torch's CUDA grouped GEMM is bf16 only
            return torch_gmm(a, b, batch_sizes, trans_a, trans_b)
        return loop_gmm(a, b, batch_sizes, trans_a, trans_b)


def torch_gmm(a, b, batch_sizes, trans_a=False, trans_b=False):
    """`loop_gmm`'s contract through `torch._grouped_mm` (groups given by device-side offsets).
    An expert without rows gets a zero weight gradient (zeroed explicitly by GroupedGLU)."""
    offs = torch.cumsum(batch_sizes, 0, dtype=torch.int32)
    if trans_a:  # [S, M]^T x [S, N] per group along S -> [E, M, N]
        return torch._grouped_mm(a.t(), b, offs=offs)
    return torch._grouped_mm(a, b.transpose(-2, -1) if trans_b else b, offs=offs)


def loop_gmm(a, b, batch_sizes, trans_a=False, trans_b=False):
    """grouped_gemm's contract with one matmul per expert.

    trans_a: a [S, M], b [S, N] -> [E, M, N] (weight gradients); else a [S, K] times b[e] ([K, N], or
    [N, K] with trans_b) -> [S, N].
    """
    sizes = batch_sizes.tolist()
    if trans_a:
        out = a.new_empty(len(sizes), a.shape[1], b.shape[1])
        for e, (ae, be) in enumerate(zip(a.split(sizes), b.split(sizes))):
            torch.mm(ae.t(), be, out=out[e])  # an empty expert gives zeros
        return out
    out = a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])
    for e, (ae, oe) in enumerate(zip(a.split(sizes), out.split(sizes))):
        if ae.shape[0]:
            torch.mm(ae, b[e].t() if trans_b else b[e], out=oe)
    return out


# --------------------------------------------------------------------------------------------------
# Gated activation. The fused Triton SwiGLU is used for transformers' default gate with SiLU
# (Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V3); any other `_apply_gate`/`act_fn` goes through autograd.


class _TorchGate:
    def __init__(self, module):
        self.module = module

    def forward(self, h):
        return self.module._apply_gate(h)

    def backward(self, h, da, want_a):
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            a = self.module._apply_gate(h)
            (dh,) = torch.autograd.grad(a, h, da)
        return dh, a.detach()


class _FusedSwiGLU:
    def forward(self, h):
        from r1lightning.moe.swiglu import swiglu_forward

        return swiglu_forward(h)

    def backward(self, h, da, want_a):
        from r1lightning.moe.swiglu import swiglu_backward

        return swiglu_backward(h, da, want_a)


def is_default_silu_gate(module) -> bool:
    gate = getattr(type(module), "_apply_gate", None)
    default = getattr(gate, "__name__", "") == "_default_apply_gate" and "transformers" in getattr(gate, "__module__", "")
    return default and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def choose_gate(module, fused: bool):
    return _FusedSwiGLU() if fused and is_default_silu_gate(module) else _TorchGate(module)


class GroupedGLU(torch.autograd.Function):
    """y = gmm(gate(gmm(x, W1^T)), W2^T) per expert, with a hand-written backward.

    Saves x and h = x W1^T; saves a = gate(h) too unless `recompute` (then the backward rebuilds
    it from h, MegaBlocks' memory-optimised MLP trick: one [S, F] tensor less per layer).
    """

    @staticmethod
    def forward(ctx, x, w1, w2, batch_sizes, gate, recompute, kernels):
        h = kernels.gmm(x, w1, batch_sizes, trans_b=True)  # [S, 2F]
        a = gate.forward(h)  # [S, F]
        y = kernels.gmm(a, w2, batch_sizes, trans_b=True)  # [S, H]
        ctx.gate, ctx.recompute, ctx.kernels = gate, recompute, kernels
        ctx.save_for_backward(x, w1, w2, batch_sizes, h, *(() if recompute else (a,)))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, batch_sizes, h, *kept = ctx.saved_tensors
        gmm = ctx.kernels.gmm
        dy = dy.contiguous()
        da = gmm(dy, w2, batch_sizes)  # [S, F]
        dh, a = ctx.gate.backward(h, da, want_a=ctx.recompute)  # rebuilds a in the same pass over h
        a = a if ctx.recompute else kept[0]
        del da
        dw2 = gmm(dy, a, batch_sizes, trans_a=True) if ctx.needs_input_grad[2] else None  # [E, H, F]
        dw1 = gmm(dh, x, batch_sizes, trans_a=True) if ctx.needs_input_grad[1] else None  # [E, 2F, H]
        dx = gmm(dh, w1, batch_sizes) if ctx.needs_input_grad[0] else None  # [S, H]
        # experts with no rows: make the zero gradient explicit (on the device when the sizes are)
        if ctx.kernels.sizes_on_device:
            has_rows = (batch_sizes > 0).view(-1, 1, 1)
            dw1, dw2 = (None if dw is None else torch.where(has_rows, dw, 0) for dw in (dw1, dw2))
        else:
            empty = (batch_sizes == 0).nonzero().flatten().tolist()
            for dw in (dw1, dw2):
                if dw is not None:
                    for e in empty:
                        dw[e].zero_()
        return dx, dw1, dw2, None, None, None, None


KERNELS = {"megablocks": MegaBlocksKernels, "torch": SyncFreeKernels}  # policy.megablocks_kernels
_KERNELS: dict[str, MegaBlocksKernels | SyncFreeKernels] = {}


def _kernels(name: str = "megablocks"):
    if name not in _KERNELS:
        _KERNELS[name] = KERNELS[name]()
    return _KERNELS[name]


def max_tokens(top_k: int, experts: int, columns: int, pad_rows: int, elements: int = INT32_ELEMENTS) -> int:
    """Tokens one call can take when its kernels index in int32: T·k rows plus < pad_rows of padding
    an expert, each `columns` wide, below `elements`."""
    return max(1, (elements // columns - experts * max(pad_rows, 1)) // top_k)


def experts_forward(module, hidden_states, top_k_index, top_k_weights, kernels, fused_gate=True, pad_rows=PAD_ROWS):
    """[T, H], [T, K] int, [T, K] -> [T, H], computed in the autocast dtype when autocast is on."""
    out_dtype = hidden_states.dtype
    num_tokens, top_k = top_k_index.shape
    if num_tokens == 0:
        return hidden_states.new_zeros(hidden_states.shape)
    w1, w2 = module.gate_up_proj, module.down_proj
    if kernels.max_elements:
        limit = max_tokens(top_k, module.num_experts, max(w1.shape[-2], hidden_states.shape[-1]), pad_rows,
                           kernels.max_elements)
        if num_tokens > limit:  # tokens are independent: chunks give the same rows
            return torch.cat([experts_forward(module, hidden_states[i:i + limit], top_k_index[i:i + limit],
                                              top_k_weights[i:i + limit], kernels, fused_gate, pad_rows)
                              for i in range(0, num_tokens, limit)])
    dtype = w1.dtype
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    # transformers' grouped_mm casts to the weights' dtype; under autocast we follow autocast like
    # nn.Linear would (bf16 GEMMs with fp32 master weights).
    with torch.autocast(device_type, enabled=False):
        x = hidden_states.to(dtype).contiguous()
        w1, w2 = w1.to(dtype).contiguous(), w2.to(dtype).contiguous()
        weights = top_k_weights.reshape(-1).to(dtype)
        expert_ids = top_k_index.reshape(-1).to(torch.int32)
        with torch.no_grad():
            routing = kernels.route(expert_ids, module.num_experts, pad_rows)
        x = kernels.gather(x, routing, top_k)  # [T*K (+ padding), H] in expert order
        batch_sizes = kernels.batch_sizes(routing)
        gate = choose_gate(module, fused_gate)
        recompute = bool(getattr(module, "_r1l_recompute_activation", False))
        y = GroupedGLU.apply(x, w1, w2, batch_sizes, gate, recompute, kernels)
        out = kernels.scatter(y, routing, weights, top_k)  # [T, H]
    return out.to(out_dtype)


def megablocks_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The function registered with transformers' ExpertsInterface: dispatches per call."""
    if hidden_states.is_cuda and unsupported_reason(self) is None:
        # module attributes only for ablations (bench_moe.py)
        fused = getattr(self, "_r1l_fused_gate", True)
        pad = getattr(self, "_r1l_pad_rows", PAD_ROWS)
        kernels = _kernels(getattr(self, "_r1l_kernels", "megablocks"))
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, kernels, fused_gate=fused,
                               pad_rows=pad)
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, megablocks_experts_forward)
