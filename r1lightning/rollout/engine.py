# Over 500 lines on purpose: the static KV cache, the CUDA-graph capture and the decode loop share buffers and invariants that one reader must see together.
"""The rollout engine: batched sampling on the live policy with a static KV cache and CUDA-graph decode.

One `generate` call:
  1. prefill: one forward over the left-padded prompts [N, P] that fills KV slots 0..P-1 (the
     policy's own experts implementation, e.g. MegaBlocks: host syncs are fine here);
  2. sample completion token 0 from the last prompt position;
  3. decode: one token per row per step, KV slot P+j-1 written for token j-1. The step is a fixed
     sequence of kernels over static buffers (token, position, slot, step counters live on the
     device and are advanced inside the step), so on CUDA it is captured once in a CUDA graph and
     replayed; the host only checks "every row has finished" every `sync_every` steps.

Weights are the policy's own parameters (no copy). A captured graph holds their addresses, so an
optimizer step, which updates them in place, is seen by the next replay; if a parameter is
replaced by a new tensor (`model.to(...)`, re-materialisation) the graphs are captured again.

The KV cache is `StaticKV` below, not transformers' `StaticCache`: its position bookkeeping moved
between transformers releases (a `cache_position` argument, then a device counter), while
`update(key, value, layer_idx, ...)` has stayed the same. The engine owns the write slot and
passes a ready 4-D attention mask, which transformers uses as given. Attention reads only the first
`kv_len` slots, rounded up to `kv_bucket` (one graph per bucket), not the whole cache.

`compile` puts the decode step through `torch.compile` instead: `reduce-overhead` lets its own CUDA
graphs replace the engine's, the other modes fuse kernels that the engine's graphs then capture. The
compiled step has one shape (attention reads the whole capacity): a compile per KV bucket would take
minutes on a real model.

Log-probs: each sampled token's log-prob under `softmax(logits / temperature)` (raw logits when
greedy), before top-k/top-p and EOS suppression, i.e. what GRPO's training forward computes, so with
mu = 1 `use_sampler_logprobs` can skip that forward (numerics: see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import weakref

import torch
from transformers.cache_utils import Cache

from r1lightning.moe import decode_experts
from r1lightning.rollout import paged_attention
from r1lightning.rollout.base import Rollout, Sampler, SamplingParams, completion_mask_from_ids, seeded_rng

log = logging.getLogger(__name__)


class StaticKV(Cache):
    """Preallocated K/V per layer [N, heads, capacity, head_dim]. Writes go to the slots in `self.slots`
    (a device tensor the engine owns), reads return the first `kv_len` slots."""

    is_compileable = True

    def __init__(self, num_layers: int, batch: int, capacity: int):
        # transformers' Cache.__init__ differs between releases and is not needed: every method the
        # models call on a cache is defined here.
        self.num_layers, self.batch, self.capacity = num_layers, batch, capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.slots: torch.Tensor | None = None  # [q] int64: slots written by the next update
        self.kv_len = capacity
        self.seen = 0  # host-side, only for code that asks get_seq_length()
        self.layers = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:  # first prefill: allocate from the layer's own shapes
            n, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(n, h, self.capacity, d)
            self.values[layer_idx] = value_states.new_zeros(n, value_states.shape[1], self.capacity, value_states.shape[3])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key_states.to(k.dtype))
        v.index_copy_(2, self.slots, value_states.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_mask_sizes(self, *args, **kwargs):
        return self.kv_len, 0

    def __len__(self):
        return self.num_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float | torch.Tensor | None) -> torch.Tensor:
    """Temperature-scaled logits [N, V] with tokens outside top-k / the top-p nucleus set to -inf.
    Top-p keeps a token when the probability mass ranked strictly above it is below `top_p`."""
    V = scaled.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None:
        scaled = _nucleus(scaled, top_p)
    return scaled


# Uncompiled inside a compiled decode step: Inductor (torch 2.11, H200) fails to generate the split cumsum
# over a 50,304-token vocabulary ("Error in codegen for ... SplitScan", session 16). Eager, the sort and
# scan are the uncompiled engine's own, and they still run inside the step's CUDA graph.
@torch.compiler.disable
def _nucleus(scaled: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    above = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = above >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


class _Graphs:
    """Static buffers, cache and captured decode graphs for one batch size and device."""

    def __init__(self):
        self.cache: StaticKV | None = None
        self.graphs: dict = {}
        self.pool = None
        self.fingerprint = None
        self.static_marked = False


class StaticCacheSampler(Sampler):
    """Fast GPU rollouts on the live policy (CPU too, without graphs). See the module docstring.

    Args:
        cuda_graphs: capture the decode step in CUDA graphs (CUDA only; False runs it eagerly).
        decode_experts: experts path at decode: `auto`, `grouped_mm`, `gather` or `triton` (see
            `decode_experts.py`; `auto` takes `triton` on CUDA in bf16 where it can run); `policy` keeps the
            policy's implementation (not graph-safe for MegaBlocks / eager experts, so only with
            `cuda_graphs: false`).
        kv_bucket: attention reads the cache up to the current length rounded up to this many slots
            (one graph per bucket).
        sync_every: decode steps between checks that every row has finished (each check waits for
            the GPU).
        min_new_tokens: EOS is never sampled before this many tokens (benchmarks with equal lengths).
        keep_cache: keep the KV cache and graphs between calls (fast); False frees them after each
            rollout (memory for the policy update).
        return_logprobs: fill `Rollout.logprobs`.
        compile: None, or a `torch.compile` mode for the decode step: `reduce-overhead` (torch's CUDA
            graphs instead of ours), `default` or `max-autotune-no-cudagraphs` (fused kernels inside
            our graphs). See the module docstring.
        timing: wait for the device at phase ends and record prefill / capture / decode seconds in
            `last_stats` (benchmarks; three extra syncs per call).
    """

    def __init__(
        self,
        cuda_graphs: bool = True,
        decode_experts: str = "auto",
        kv_bucket: int = 64,
        sync_every: int = 16,
        min_new_tokens: int = 0,
        keep_cache: bool = True,
        return_logprobs: bool = True,
        compile: str | None = None,
        timing: bool = False,
    ):
        if decode_experts not in decode_experts_modes():
            raise ValueError(f"decode_experts: {decode_experts!r} is not one of {', '.join(decode_experts_modes())}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: {compile!r} is not one of {', '.join(map(str, COMPILE_MODES))}")
        self.compile = compile
        self._compiled_step = None
        self.cuda_graphs = cuda_graphs
        self.decode_experts = decode_experts
        self.kv_bucket = max(1, int(kv_bucket))
        self.sync_every = max(1, int(sync_every))
        self.min_new_tokens = int(min_new_tokens)
        self.keep_cache = keep_cache
        self.return_logprobs = return_logprobs
        self.timing = timing
        self._state: dict = {}
        self.last_stats: dict = {}
        self.last_release_collected = False  # the last release needed gc.collect() to free the KV

    release_after_call = True  # keep_cache False: free at the end of each call (the paged engine: at the update)

    # -- public ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, params: SamplingParams, eos_token_id, pad_token_id,
                 forced_lengths: torch.Tensor | None = None) -> Rollout:
        """`forced_lengths` [N] (benchmarks only): row i ends with an EOS at completion token
        `forced_lengths[i]` (1-based; EOS is suppressed before it), to time given length distributions."""
        N, P = prompt_ids.shape
        C = int(params.max_new_tokens)
        device = prompt_ids.device
        if C <= 0:
            empty = prompt_ids.new_zeros(N, 0)
            return Rollout(prompt_ids, prompt_mask, empty, empty.clone(), torch.ones(N, dtype=torch.bool, device=device),
                           empty.float() if self.return_logprobs else None)
        use_graphs = self.cuda_graphs and device.type == "cuda" and self.compile != "reduce-overhead"
        was_training = model.training
        model.eval()
        prev_experts = getattr(model.config, "_experts_implementation", None)
        prev_attn = getattr(model.config, "_attn_implementation", None)
        try:
            if prev_attn not in ("sdpa", "eager"):  # flash/flex attention do not take our 4-D mask
                model.set_attn_implementation("sdpa")
            with self._autocast(device):
                return self._generate(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id,
                                      N, P, C, use_graphs, prev_experts, forced_lengths)
        finally:
            if getattr(model.config, "_experts_implementation", None) != prev_experts and prev_experts is not None:
                model.set_experts_implementation(prev_experts)
            if prev_attn not in ("sdpa", "eager") and prev_attn is not None:
                model.set_attn_implementation(prev_attn)
            model.train(was_training)
            if not self.keep_cache and self.release_after_call:
                self.release()

    def release(self) -> None:
        """Free the KV caches and graphs (the next call captures again)."""
        caches = [weakref.ref(t) for st in self._state.values() for t in _cache_tensors(st)]
        for st in self._state.values():
            _teardown(st)  # breaks the cycles through the state (graphs and step closures refer to it)
        self._state.clear()
        # Anything still holding the KV through another cycle would keep it through the whole policy
        # update; a full collection finds it, at ~0.2 s in a process with transformers and Lightning
        # loaded, so it runs only then.
        self.last_release_collected = any(ref() is not None for ref in caches)
        if self.last_release_collected:
            gc.collect()

    def release_for_update(self) -> None:
        # `keep_cache` decides: True keeps the cache through the update (fast), False already freed it.
        if not self.keep_cache:
            self.release()

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _autocast(device):
        # Graphs must not capture autocast's weight-cast cache (it would hold stale casts).
        if torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)
        return contextlib.nullcontext()

    def _generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, N, P, C, use_graphs, prev_experts,
                  forced_lengths=None):
        device = prompt_ids.device
        capacity = _round_up(P + C, self.kv_bucket)
        step_fn = self._step_fn()
        key = (N, str(device))
        st = self._state.get(key)
        fp = _fingerprint(model)
        if st is None or st.cache.capacity < capacity or st.fingerprint != fp or st.model is not model:
            st = self._new_state(model, N, capacity, device)
            st.fingerprint = fp
            self._state = {key: st}  # one live batch size at a time: caches are large
        cache = st.cache
        mask_dtype = self._mask_dtype(model)
        if self.compile:  # one shape across calls whatever the prompt length: the whole allocated cache
            kv_len_at = lambda j: cache.capacity  # noqa: E731
        else:
            kv_len_at = lambda j: min(capacity, _round_up(P + j, self.kv_bucket))  # noqa: E731

        # -- per-call inputs into the static buffers --
        eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
        st.eos_mask.zero_()
        st.eos_mask[eos[(eos >= 0) & (eos < st.eos_mask.numel())]] = True  # ids outside the vocab are never sampled
        st.pad.fill_(pad_token_id)
        st.allowed.zero_()
        st.allowed[:, :P] = prompt_mask.bool()
        st.allowed[:, P:] = True
        st.temperature.fill_(params.temperature if not params.greedy else 1.0)
        st.top_p_value.fill_(params.top_p)
        st.min_new.fill_(self.min_new_tokens)
        forced = forced_lengths is not None
        if forced:
            st.force_len.copy_(_check_forced(forced_lengths, N, C))
            st.force_mask.zero_()[_forced_token(eos, st.force_mask.numel())] = True
        st.out_ids.fill_(pad_token_id)
        st.out_logp.zero_()
        st.done.zero_()
        mode = sampling_mode(params, forced)

        clock = _Clock(device if self.timing else None)
        # -- prefill --
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & prompt_mask.bool()[:, None, :]
        allowed |= torch.eye(P, dtype=torch.bool, device=device)[None]  # pad queries see themselves: no NaN rows
        cache.slots = torch.arange(P, device=device)
        cache.kv_len, cache.seen = P, 0
        logits = self._forward(model, prompt_ids, self._mask(allowed[:, None], mask_dtype), positions, cache, keep_last=True)
        cache.seen = P
        if self.compile == "reduce-overhead" and not st.static_marked:
            # The step updates these buffers in place: as static addresses torch's graphs keep them.
            for t in (*vars(st).values(), *cache.keys, *cache.values):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t)
            st.static_marked = True
        t_prefill = clock()

        # -- decode state --
        st.positions.copy_(prompt_mask.long().sum(-1, keepdim=True))
        st.slot.fill_(P)
        st.step.fill_(0)
        experts = self.decode_experts
        if experts != "policy" and prev_experts is not None and _has_experts(model):
            decode_experts.register()
            model.set_experts_implementation(decode_experts.NAME)
            decode_experts.set_decode_mode(model, experts)
        elif experts == "policy" and use_graphs:
            raise ValueError("decode_experts: 'policy' is not graph-safe; set cuda_graphs: false")

        buckets = sorted({kv_len_at(j) for j in range(1, C)})
        if use_graphs:
            for kv_len in buckets:
                if (kv_len, mode) not in st.graphs:
                    self._capture(st, model, kv_len, mode, mask_dtype, step_fn)
            st.positions.copy_(prompt_mask.long().sum(-1, keepdim=True))  # warm-up steps advanced these
            st.slot.fill_(P)
            st.step.fill_(0)
            st.done.zero_()
            st.out_ids.fill_(pad_token_id)
            st.out_logp.zero_()
        t_capture = clock()

        with seeded_rng(params.seed, device):
            # token 0 from the prefill logits, then C - 1 decode steps
            st.logits.copy_(logits)
            self._sample_into(st, mode)
            steps = 1
            for j in range(1, C):
                if use_graphs:
                    st.graphs[(kv_len_at(j), mode)].replay()
                else:
                    cache.kv_len = kv_len_at(j)
                    step_fn(st, model, mode, mask_dtype)
                steps += 1
                if steps % self.sync_every == 0 and bool(st.done.all()):
                    break
        t_decode = clock()
        self.last_stats = dict(steps=steps, prefill_tokens=N * P, graphs=len(st.graphs), kv_bytes=cache.nbytes(),
                               prefill_s=t_prefill, capture_s=t_capture, decode_s=t_decode)

        completion_ids = st.out_ids[:, :steps].clone()
        mask, truncated = completion_mask_from_ids(completion_ids, eos_token_id)
        completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
        logprobs = (st.out_logp[:, :steps] * mask).clone() if self.return_logprobs else None
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, logprobs)

    def _new_state(self, model, N, capacity, device) -> _Graphs:
        st = _Graphs()
        st.model = model
        st.cache = StaticKV(model.config.get_text_config().num_hidden_layers, N, capacity)
        V = model.get_output_embeddings().weight.shape[0]
        long = dict(dtype=torch.long, device=device)
        st.tok = torch.zeros(N, 1, **long)  # token fed at the next decode step
        st.positions = torch.zeros(N, 1, **long)
        st.slot = torch.zeros(1, **long)
        st.step = torch.zeros(1, **long)  # index of the completion token the next sample produces
        st.done = torch.zeros(N, dtype=torch.bool, device=device)
        st.allowed = torch.zeros(N, capacity, dtype=torch.bool, device=device)
        st.arange = torch.arange(capacity, device=device)
        st.logits = torch.zeros(N, V, dtype=torch.float32, device=device)
        st.temperature = torch.ones((), device=device)
        st.top_p_value = torch.ones((), device=device)
        st.min_new = torch.zeros((), **long)
        st.pad = torch.zeros((), **long)
        st.out_ids = torch.zeros(N, capacity, **long)
        st.out_logp = torch.zeros(N, capacity, dtype=torch.float32, device=device)
        st.eos_mask = torch.zeros(V, dtype=torch.bool, device=device)  # a static buffer: graphs read its address
        st.force_len = torch.zeros(N, **long)  # forced_lengths (benchmarks)
        st.force_mask = torch.zeros(V, dtype=torch.bool, device=device)  # the token a forced length ends with
        return st

    @staticmethod
    def _mask_dtype(model):
        # SDPA takes a boolean mask (True = attend); eager attention adds the mask to its scores.
        if getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", paged_attention.ATTN_IMPLEMENTATION):  # its fallback is SDPA
            return torch.bool
        return model.dtype

    @staticmethod
    def _mask(allowed, dtype):
        if dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _forward(self, model, ids, mask4d, positions, cache, keep_last=False, **extra):
        kwargs = {_cache_kwarg(model): cache, "use_cache": True, **extra}
        if hasattr(model.config, "output_router_logits"):
            kwargs["output_router_logits"] = False
        if keep_last and _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=ids, attention_mask=mask4d, position_ids=positions, **kwargs)
        return out.logits[:, -1].float()

    def _decode_step(self, st, model, mode, mask_dtype):
        """One decode step over static buffers only (the body captured in a graph)."""
        cache = st.cache
        cache.slots = st.slot
        kv = cache.kv_len
        allowed = st.allowed[:, :kv] & (st.arange[:kv] <= st.slot)[None]
        mask4d = self._mask(allowed[:, None, None, :], mask_dtype)
        logits = self._forward(model, st.tok, mask4d, st.positions, cache)
        st.logits.copy_(logits)
        st.positions.add_(1)
        st.slot.add_(1)
        self._sample_into(st, mode)

    def _sample_into(self, st, mode):
        """Sample from st.logits into out_ids/out_logp at column st.step; advance st.step; update done."""
        nxt, logp = draw(st, mode, st.step, st.force_len, self.min_new_tokens > 0)
        nxt = torch.where(st.done, st.pad, nxt)
        logp = logp.masked_fill(st.done, 0.0)
        st.out_ids.index_copy_(1, st.step, nxt[:, None])
        st.out_logp.index_copy_(1, st.step, logp[:, None])
        st.done |= st.eos_mask[nxt]
        st.tok.copy_(nxt[:, None])
        st.step.add_(1)

    def _step_fn(self, dynamic: bool | None = False):
        if self.compile is None:
            return self._decode_step
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._decode_step, mode=self.compile, dynamic=dynamic)
        return self._compiled_step

    def _capture(self, st, model, kv_len, mode, mask_dtype, step_fn):
        st.cache.kv_len = kv_len
        snapshot = [t.clone() for t in (st.tok, st.positions, st.slot, st.step, st.done)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), rng_untouched():  # warm-up outside the graph: lazy inits, cuBLAS workspaces
            for _ in range(2):
                for t, s in zip((st.tok, st.positions, st.slot, st.step, st.done), snapshot):
                    t.copy_(s)
                step_fn(st, model, mode, mask_dtype)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip((st.tok, st.positions, st.slot, st.step, st.done), snapshot):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=st.pool):
            step_fn(st, model, mode, mask_dtype)
        st.pool = graph.pool()
        st.graphs[(kv_len, mode)] = graph


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs")


@contextlib.contextmanager
def rng_untouched():
    """The CUDA generator's state as it was when the block began. A capture's eager warm-up steps draw
    random numbers; graphs are kept across calls, so only the call that captures would draw them and
    two calls with the same seed would sample differently."""
    state = torch.cuda.get_rng_state()
    try:
        yield
    finally:
        torch.cuda.set_rng_state(state)


def sampling_mode(params: SamplingParams, forced: bool) -> tuple:
    """What a captured step samples with (one graph per mode): kind, top-k, top-p on, forced lengths."""
    if params.greedy:
        return ("greedy", 0, False, forced)
    return ("sample", int(params.top_k or 0), params.top_p < 1.0, forced)


def draw(st, mode, step, force_len, min_new: bool):
    """Next token and its log-prob [N] from `st.logits` [N, V], with no host synchronisation.

    `step` (scalar or [N]) is the index of the completion token being drawn. The log-prob is the
    unfiltered `log_softmax(logits / temperature)` (raw logits when greedy); EOS is suppressed while
    `step < st.min_new` (`min_new`), and with forced lengths (mode[3]) before `force_len - 1`, where
    the token in `st.force_mask` is chosen instead."""
    logits = st.logits
    if mode[0] == "greedy":
        logp_all = torch.log_softmax(logits, dim=-1)
        choose = logits
    else:
        scaled = logits / st.temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        choose = filter_logits(scaled, mode[1], st.top_p_value if mode[2] else None)
    step = step.reshape(-1, 1)  # [1, 1] or [N, 1]
    if min_new:  # forbid EOS before min_new_tokens
        choose = choose.masked_fill((step < st.min_new) & st.eos_mask[None], float("-inf"))
    if mode[3]:
        choose = choose.masked_fill((step < force_len[:, None] - 1) & st.eos_mask[None], float("-inf"))
        # The forced token wins the argmax below (+inf). Session 15's `where` on the argmax's result made
        # Triton fail on the whole compiled decode step on the H200 (`PassManager::run failed`); this
        # form compiles there (session 16). Alone, both forms compile: the failure needs the fusion.
        forced_now = (step == force_len[:, None] - 1) & st.force_mask[None]
        choose = choose.masked_fill(forced_now, float("inf"))
    if mode[0] == "greedy":
        nxt = choose.argmax(dim=-1)
    else:
        # Gumbel-max: argmax(log p + Gumbel) is a draw from p, with no host-side sampling call.
        noise = torch.empty_like(choose).exponential_().clamp_min_(1e-30).log_()
        nxt = (choose - noise).argmax(dim=-1)
    logp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
    return nxt, logp


def _forced_token(eos: torch.Tensor, V: int) -> int:
    """The token a forced length ends with: the first EOS id, which must be in the vocabulary (it is chosen by
    setting its logit to +inf, inside the sampling reduction)."""
    token = int(eos[0])
    if not 0 <= token < V:
        raise ValueError(f"forced_lengths: EOS id {token} is outside the vocabulary ({V} tokens)")
    return token


def _check_forced(forced_lengths, N: int, C: int) -> torch.Tensor:
    forced = torch.as_tensor(forced_lengths).reshape(-1)
    if forced.numel() != N or bool((forced < 1).any()):
        raise ValueError(f"forced_lengths: need {N} lengths >= 1, got {forced.numel()} (min {int(forced.min())})")
    return forced.clamp(max=C + 1).long()  # above C: never forced (the row runs to max_new_tokens)


class _Clock:
    """Seconds since the previous call, after waiting for the device; None when timing is off."""

    def __init__(self, device):
        import time

        self.device, self.time = device, time.perf_counter
        self.last = self.time() if device is not None else None

    def __call__(self):
        if self.device is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.time()
        elapsed, self.last = now - self.last, now
        return elapsed


def decode_experts_modes() -> tuple[str, ...]:
    return decode_experts.MODES + ("policy",)


def _has_experts(model) -> bool:
    from r1lightning.moe import experts_modules

    return next(experts_modules(model), None) is not None


def _fingerprint(model):
    # Addresses the graphs were captured with; a replaced parameter or buffer means capture again.
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(b.data_ptr() for b in model.buffers())


_CACHE_KW: dict = {}


def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` (the old name still works, with a warning).
    cls = type(model)
    if cls not in _CACHE_KW:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[cls]


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(type(model).forward).parameters


def _teardown(state, seen: set | None = None) -> None:
    """Empty a sampler state and the states it holds in its dicts (the paged engine's per-width views)."""
    seen = set() if seen is None else seen
    if id(state) in seen:
        return
    seen.add(id(state))
    for value in list(vars(state).values()):
        if isinstance(value, dict):
            for inner in list(value.values()):
                if isinstance(inner, type(state)) or hasattr(inner, "graphs"):
                    _teardown(inner, seen)
    vars(state).clear()


def _cache_tensors(state) -> list:
    """The KV tensors a sampler state owns (the largest thing it holds)."""
    cache = vars(state).get("cache")
    return list(getattr(cache, "keys", [])) + list(getattr(cache, "values", []))
