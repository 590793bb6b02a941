# Over 500 lines on purpose: the block pool, the slot scheduler (admit, preempt, compact) and the graph-captured decode step share the block tables; split, each would be unreadable alone.
"""The paged rollout engine: continuous batching over a fixed number of slots, KV in a pool of blocks.

All N samples of a call are known up front. They run through S = min(N, `max_slots`) slots; a
finished sample frees its slot and the next waiting sample takes it (its prompt is prefilled into
that slot). KV lives in one pool per layer of fixed-size blocks ([blocks x block_size, kv_heads,
head_dim]); a slot's block table [S, max_blocks] lists the blocks its sequence has written, so a slot
holds only what it wrote (plus at most `sync_every` tokens of look-ahead) and a freed block goes to
the next sample. The pool's size is the memory budget (`kv_cache_gib`); when growing sequences run
out of blocks, the most recently admitted one is preempted (its blocks freed, its prompt and the
tokens it sampled so far prefilled again later: recompute, no swap).

Shapes stay fixed, so the decode step is captured in CUDA graphs as in `StaticCacheSampler`: the
step scatters each slot's new K/V to `block_table[slot, pos // block_size]`, and gathers the slot's
first `kv_len` positions through its block table for attention (one graph per `kv_len` bucket,
captured the first time a call reaches it), or, with `attention` pool/kernel, reads each slot's blocks
in place up to its own length (one `kv_len`, one graph per width). A slot's sequence is stored without padding: KV index t
is position id t, and the mask lets slot s attend to t <= pos[s], so whatever an earlier occupant
left in a reused block is never read. Idle slots (finished, waiting for the next sync) compute on
and write to a trash area; they cost time, not correctness.

The host runs `sync_every` replays, then reads the slot states once (which slots finished, where
each stands), frees, allocates blocks for the next `sync_every` steps, preempts if needed and admits
waiting samples (prefill forwards of bounded size, `prefill_chunk`, with the policy's own experts;
with `admit_batch`, only once enough slots are free).

Tail: once no sample waits, the live sequences move to the first slots (their block-table rows move,
not their KV) and a step over a power-of-two number of slots runs (`compact_tail`), so the last long
sequences do not pay for idle slots.

Memory: `release_for_update()` (GRPO calls it after scoring, before the update) frees the pool and
the graphs unless `keep_cache`; the next rollout allocates and captures again (gather: ~16 KV
buckets, the bucket grows with the length; pool / kernel: one; times the tail widths reached).

Output: the same `Rollout` as the static engine (completion ids, masks, truncation flags, sampler
log-probs), rows in input order. Sampling draws differ from the static engine (slots, not rows, draw
noise), greedy decoding does not.
"""

from __future__ import annotations

import collections
import logging

import torch
from transformers.cache_utils import Cache

from r1lightning.errors import UserError
from r1lightning.moe import decode_experts
from r1lightning.moe.backend import triton_available
from r1lightning.rollout import paged_attention
from r1lightning.rollout.base import Rollout, completion_mask_from_ids, seeded_rng
from r1lightning.rollout.engine import (
    StaticCacheSampler,
    _check_forced,
    _forced_token,
    _Clock,
    _fingerprint,
    _has_experts,
    _round_up,
    draw,
    rng_untouched,
    sampling_mode,
)

GIB = 1 << 30
log = logging.getLogger(__name__)
# `kv_dtype`: the pool's element type. fp8 (e4m3) halves the pool's memory and the bytes a decode step
# reads per token of KV, but the attention read at 4,096 tokens on the OLMoE shape takes 7.06 ms in fp8
# against 8.26 in bf16, of a 15.2 ms decode step (docs/benchmarks.md, sessions 13-14): fp8 buys room
# (twice the tokens a pool holds) more than speed.
KV_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _fp8(pool: torch.Tensor) -> bool:
    return pool.dtype == torch.float8_e4m3fn


def write_rows(pool: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """pool[rows] = x in the pool's dtype. fp8 is clamped to its largest finite value first (a cast past
    it is not guaranteed to saturate), and written through a byte view: index_copy_ has no fp8 kernel on
    the CPU."""
    if _fp8(pool):
        pool.view(torch.uint8).index_copy_(0, rows, x.clamp(-FP8_MAX, FP8_MAX).to(pool.dtype).view(torch.uint8))
    else:
        pool.index_copy_(0, rows, x.to(pool.dtype))


class PagedKV(Cache):
    """Per layer a pool [rows, kv_heads, head_dim] (rows = blocks x block_size). The engine sets the
    rows written and read by the next forward:

    * prefill: `dest` [m] pool rows for the m real tokens `sel` [m] of the flattened [n * q] batch;
      attention runs over the prompt batch itself (update returns the new K/V as given);
    * decode: `write` [S] pool rows for each slot's token, `read` [S, kv_len] pool rows of each
      slot's sequence; update returns the gathered [S, heads, kv_len, head_dim].
    """

    is_compileable = True

    def __init__(self, num_layers: int, rows: int, heads: int, head_dim: int, dtype, device, block_size: int = 1):
        self.num_layers, self.rows, self.block_size = num_layers, rows, block_size
        self.keys = [torch.zeros(rows, heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(rows, heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.sel = self.dest = self.write = self.read = None
        # `gather`: decode returns each slot's KV copied out of the pool through `read`. `kernel` / `pool`:
        # decode returns the pools themselves and attention reads each slot's blocks through `table` up
        # to `lengths` (rollout/paged_attention.py: the Triton kernel / its PyTorch reference)
        self.attention = "gather"
        self.table = self.lengths = None
        self.prefill = True
        self.kv_len = 0
        self.layers = []
        # fp8 pool: the largest |K|, |V| prefilled, kept on the device (read once a call): values past
        # ±448 saturate, which the engine reports rather than hides
        self.absmax = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n, h, q, d = key_states.shape
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if (h, d) != tuple(K.shape[1:]):
            raise ValueError(f"paged KV: layer {layer_idx} has K/V heads x dim {h} x {d}, the pool {tuple(K.shape[1:])}")
        k = key_states.transpose(1, 2).reshape(n * q, h, d)
        v = value_states.transpose(1, 2).reshape(n * q, h, d)
        if self.prefill:
            k, v = k[self.sel], v[self.sel]
            write_rows(K, self.dest, k)
            write_rows(V, self.dest, v)
            if _fp8(K):
                seen = torch.maximum(k.abs().amax(), v.abs().amax()).float()
                self.absmax = seen if self.absmax is None else torch.maximum(self.absmax, seen)
            return key_states, value_states
        write_rows(K, self.write, k)
        write_rows(V, self.write, v)
        if self.attention != "gather":
            return K, V
        S, T = self.read.shape
        dtype = key_states.dtype  # a pool kept in another dtype (e.g. fp32 parameters, bf16 compute) is read as computed
        return (K[self.read].view(S, T, h, d).transpose(1, 2).to(dtype),
                V[self.read].view(S, T, h, d).transpose(1, 2).to(dtype))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def get_mask_sizes(self, *args, **kwargs):
        return self.kv_len, 0

    def __len__(self):
        return self.num_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class WidthCompiledStep:
    """The decode step under `compile` with tail compaction: compiled for the first width, then once more with
    the width dynamic. If Inductor fails on a compile, it says so once and compiles each width on its own
    instead; if a width's own compile fails too, the step runs uncompiled from then on, with a warning (each
    failed compile of the OLMoE-shaped step cost ~37 s on the H200, and the failures seen were of the step's
    code, not of one width: session 16). A failed compile has run nothing (the step is one graph), so the call
    is simply repeated."""

    def __init__(self, fn, mode: str):
        self.fn, self.mode = fn, mode
        self.shared = torch.compile(fn, mode=mode, dynamic=None)
        self.per_width: dict[int, object] | None = None  # set once the shared compile has failed
        self.eager = False  # set once a per-width compile has failed

    def __call__(self, st, model, mode, mask_dtype):
        if self.eager:
            return self.fn(st, model, mode, mask_dtype)
        if self.per_width is None:
            try:
                return self.shared(st, model, mode, mask_dtype)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                first = str(err).strip().splitlines()
                log.warning("compile: %s failed for the decode step at width %d (%s); compiling each width on its "
                            "own from here", self.mode, st.tok.shape[0], first[0][:200] if first else type(err).__name__)
                self.per_width = {}
        width = st.tok.shape[0]
        if width not in self.per_width:
            self.per_width[width] = torch.compile(self.fn, mode=self.mode, dynamic=False)
        # each width and sampling mode is one more entry in the step's compile cache: room for all of them
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            try:
                return self.per_width[width](st, model, mode, mask_dtype)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                # the step uncompiled is the default engine's own: slower, never wrong
                log.warning("compile: %s failed for the decode step at width %d as well (%s); the decode step "
                            "runs uncompiled from here", self.mode, width, type(err).__name__)
                self.eager = True
                return self.fn(st, model, mode, mask_dtype)


class _PagedState:
    """Pool, slot buffers and graphs for one (slots, blocks, block table width, device)."""

    def __init__(self):
        self.graphs: dict = {}
        self.views: dict = {}
        self.pool = None
        self.static_marked = False
        self.dummy_base = 0


def kv_bytes_per_token(model, device, kv_dtype: str = "auto") -> int:
    """Bytes of K and V one token adds over all layers, in the dtype the engine stores them (`kv_dtype`:
    the paged engine's option; `auto` is the compute dtype, as transformers' caches keep)."""
    layers, heads, head_dim, dtype = PagedSampler._kv_shape(model, device, kv_dtype)
    return 2 * layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedSampler(StaticCacheSampler):
    """Continuous batching with paged KV; see the module docstring. Takes the static engine's options
    (`cuda_graphs`, `decode_experts`, `sync_every`, `min_new_tokens`, `return_logprobs`, `compile`,
    `timing`) and:

    Args:
        max_slots: sequences decoded at once (the graph batch); more samples wait for a free slot.
        kv_cache_gib: size of the KV block pool in GiB. None: what every slot needs at full length,
            capped on CUDA at `kv_memory_fraction` of the free device memory. A pool that cannot hold
            one sequence (prompt + max_new_tokens) is a UserError.
        kv_memory_fraction: the cap above (None budget only).
        block_size: tokens per KV block.
        kv_bucket: `gather` attention reads each slot up to the longest live sequence rounded up to
            this many tokens (one graph per bucket); None: a multiple of `block_size` giving at most
            16 buckets over the longest sequence. Unused by `pool` attention (each slot to its own length).
        keep_cache: keep pool and graphs through the policy update (`release_for_update` does
            nothing); False frees them there and the next rollout captures again.
        compact_tail: once no sample waits, move the live sequences to the first slots and decode
            only a power-of-two number of slots (a graph per width reached; under `compile` one more
            compile with the width dynamic, or one per width where that fails: `WidthCompiledStep`;
            not with `compile: reduce-overhead`).
        attention: how decode attention reads the KV. `gather`: each slot's first `kv_len` pool rows
            copied into a dense tensor, then SDPA. `pool`: straight from the pool through the block
            tables, each slot up to its own length (`rollout/paged_attention.py`: a Triton kernel on
            CUDA, its PyTorch reference elsewhere; one opaque op inside a compiled step). `auto`: `pool`
            on CUDA where Triton imports, the head shape suits the kernel and `compile` is off; else
            `gather`. `compile: default` with `pool` took a GRPO step 13-15 % faster than the defaults
            at 256 and 1,024 tokens on an H200 (docs/benchmarks.md, session 15).
        prefill_chunk: most tokens of one sequence per prefill forward. Longer prompts, and sequences
            preempted after sampling thousands of tokens, are prefilled in chunks of this many, so a
            prefill's transient memory stays bounded next to a pool sized to most of the free memory.
        admit_batch: admit waiting samples only once this many slots are free (or every waiting one
            fits, or no slot is decoding). Each admission is an eager prefill forward (~2 decode steps
            of time on the OLMoE shape) while an idle slot costs a decode step little, so fewer, larger
            admissions can pay; 1 admits at every sync. Long-tailed GRPO steps at 1,024 tokens spent
            1.7 s of 16 s prefilling (docs/benchmarks.md, session 7); the trade is not yet measured.
        kv_dtype: `auto`: the pool keeps K and V in the compute dtype. `fp8`: float8 e4m3 with no scale
            (values saturate at ±448; the largest prefilled |K|, |V| is `last_stats["kv_absmax"]`, with a
            warning once past it): half the pool's bytes, so a decode step reads half the KV and
            the pool holds twice the tokens. Attention reads the rounded K/V (a sequence's own prompt
            attends to itself unrounded at prefill); each element is rounded to 3 mantissa bits
            (relative error up to 1/16). Opt-in. Timed on the GPU for the attention read alone (session 14:
            7.06 ms against bf16's 8.26 at 4,096 tokens, with fp8's 5-stage launch); a GRPO step not yet.
    """

    release_after_call = False

    def __init__(self, max_slots: int = 256, kv_cache_gib: float | None = None, kv_memory_fraction: float = 0.75,
                 block_size: int = 64, kv_bucket: int | None = None, keep_cache: bool = False, compact_tail: bool = True,
                 attention: str = "auto", prefill_chunk: int = 2048, admit_batch: int = 1, kv_dtype: str = "auto",
                 **kwargs):
        super().__init__(kv_bucket=kv_bucket or block_size, keep_cache=keep_cache, **kwargs)
        if int(max_slots) < 1:
            raise UserError(f"max_slots: must be >= 1, got {max_slots}")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise UserError(f"kv_cache_gib: must be > 0 (or null for the default), got {kv_cache_gib}")
        self.max_slots = int(max_slots)
        self.kv_cache_gib = kv_cache_gib
        self.kv_memory_fraction = float(kv_memory_fraction)
        self.block_size = max(1, int(block_size))
        self.auto_bucket = kv_bucket is None
        self.compact_tail = compact_tail
        if attention not in ("auto", "pool", "gather"):
            raise UserError(f"attention: must be auto, pool or gather, got {attention!r}")
        self.attention = attention
        if int(prefill_chunk) < 1:
            raise UserError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        if int(admit_batch) < 1:
            raise UserError(f"admit_batch: must be >= 1, got {admit_batch}")
        self.admit_batch = int(admit_batch)
        if kv_dtype not in KV_DTYPES:
            raise UserError(f"kv_dtype: must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        self._warned_saturation = False
        self._warned_preemption = False

    def kv_token_bytes(self, model, device) -> int:
        """Bytes of K and V one token takes in this engine's pool."""
        return kv_bytes_per_token(model, device, self.kv_dtype)

    def release_for_update(self) -> None:
        if not self.keep_cache:
            self.release()

    @property
    def _compacts(self) -> bool:
        # torch's own graphs (reduce-overhead) would record one per width over views of static buffers: no
        # compaction there; other compile modes compile the step once more with the width dynamic
        return self.compact_tail and self.compile != "reduce-overhead"

    def _step_fn(self):
        # with compaction, dynamic=None: the first width compiles static, the next one with the width
        # dynamic, so the tail's power-of-two widths share one compiled step instead of one compile each
        if self.compile is None or not self._compacts:
            return super()._step_fn(dynamic=False)
        if self._compiled_step is None:
            self._compiled_step = WidthCompiledStep(self._decode_step, self.compile)
        return self._compiled_step

    # -- sizes -----------------------------------------------------------------------------------
    @staticmethod
    def _kv_shape(model, device, kv_dtype: str = "auto"):
        """(layers, KV heads, head dim, the pool's dtype: `kv_dtype`'s, or the compute dtype for `auto`)."""
        c = model.config.get_text_config()
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = next(model.parameters()).dtype
        return c.num_hidden_layers, heads, head_dim, KV_DTYPES[kv_dtype] or dtype

    def memory_budget(self, device) -> float | None:
        """Bytes the pool may take when sized from free memory: `kv_memory_fraction` of what is free on the
        device, cached unused by torch's allocator, or held by a pool about to be replaced. Infinite when
        its size is fixed (`kv_cache_gib`: freeing memory would not grow it); None off CUDA (no bound)."""
        if self.kv_cache_gib is not None:
            return float("inf")
        if device.type != "cuda":
            return None
        free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                + sum(st.cache.nbytes() for st in self._state.values()))
        return self.kv_memory_fraction * free

    def _pool_blocks(self, model, device, S, blocks_per_seq, trash_blocks) -> tuple[int, int]:
        """(blocks in the pool, bytes per block) under the budget."""
        per_block = self.kv_token_bytes(model, device) * self.block_size
        need = S * blocks_per_seq + trash_blocks
        if self.kv_cache_gib is not None:
            blocks = int(self.kv_cache_gib * GIB // per_block)
            where = f"kv_cache_gib: {self.kv_cache_gib} GiB"
        else:
            blocks = need
            where = "the KV pool"
            budget = self.memory_budget(device)
            if budget is not None:
                blocks = min(need, int(budget // per_block))
                where = f"kv_memory_fraction {self.kv_memory_fraction} of {budget / self.kv_memory_fraction / GIB:.1f} GiB free"
        if blocks - trash_blocks < blocks_per_seq:
            raise UserError(f"{where} holds {max(blocks - trash_blocks, 0) * self.block_size} KV tokens "
                            f"({per_block / self.block_size / 1024:.0f} KiB each); one sequence (prompt + max_new_tokens, "
                            f"in blocks of {self.block_size}) needs {blocks_per_seq * self.block_size}: "
                            f"raise kv_cache_gib or lower max_new_tokens")
        return min(blocks, need), per_block

    # -- the call --------------------------------------------------------------------------------
    def _generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, N, P, C, use_graphs, prev_experts,
                  forced_lengths=None):
        device = prompt_ids.device
        bs = self.block_size
        S = min(N, self.max_slots)
        st = next(iter(self._state.values()), None)
        if st is not None and S <= st.S <= self.max_slots:
            S = st.S  # a live pool with more slots serves fewer samples (dynamic sampling's retries)
        lengths = prompt_mask.long().sum(-1)  # real prompt tokens per sample
        Pmax = int(lengths.max())
        MB = -(-(Pmax + C) // bs)  # block-table width: one sequence at full length
        trash = -(-S // bs)  # blocks 0..trash-1: where idle slots write
        fp = _fingerprint(model)
        # reuse the pool while it fits: same slots, a table at least as wide, a pool that holds one sequence
        if (st is None or st.fingerprint != fp or st.model is not model or st.S != S or st.MB < MB or str(st.device) != str(device)
                or st.blocks - trash < MB or (self.kv_cache_gib is not None and st.budget != self.kv_cache_gib)):
            blocks, per_block = self._pool_blocks(model, device, S, MB, trash)
            MB += 2  # table headroom: the next batch's prompts may be a little longer
            st = None
            self.release()  # the old pool goes before the new one is allocated
            st = self._new_paged_state(model, S, MB, blocks, C, N, device)
            st.fingerprint, st.S, st.MB, st.device, st.blocks, st.per_block = fp, S, MB, device, blocks, per_block
            st.budget = self.kv_cache_gib
            self._state = {(S, MB, str(device)): st}
        MB, blocks, per_block = st.MB, st.blocks, st.per_block
        seq_blocks = -(-(Pmax + C) // bs)  # what one sequence of this call can reach (MB: the table, wider)
        if st.out_ids.numel() < N * C + S:  # more samples or tokens than the graphs were captured with
            st.out_ids = torch.empty(N * C + S, dtype=torch.long, device=device)
            st.out_logp = torch.empty(N * C + S, dtype=torch.float32, device=device)
            st.graphs, st.pool, st.static_marked, st.views = {}, None, False, {}
        st.dummy_base = st.out_ids.numel() - S  # idle slot s writes its draw to out cell dummy_base + s
        cache = st.cache
        path = self._attention_path(model, device)
        cache.attention = path
        prev_attn = model.config._attn_implementation
        if path != "gather":
            paged_attention.register()
            model.set_attn_implementation(paged_attention.ATTN_IMPLEMENTATION)  # SDPA unless given paged_kv
        try:
            out = self._run(model, st, cache, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, N, C, use_graphs,
                            prev_experts, forced_lengths, MB, blocks, per_block, seq_blocks)
            self.last_stats["attention"] = path
            return out
        finally:
            if path != "gather":
                model.set_attn_implementation(prev_attn)

    def _attention_path(self, model, device) -> str:
        """How decode attention reads the KV (`attention`, see the class doc): `kernel` (Triton, from
        the pool), `pool` (the PyTorch reference, from the pool) or `gather`."""
        heads = model.config.get_text_config().num_attention_heads
        _, kv_heads, head_dim, _ = self._kv_shape(model, device)
        group = heads // kv_heads if heads % kv_heads == 0 else 0
        kernel = (device.type == "cuda" and triton_available()
                  and paged_attention.kernel_supports(head_dim, group, self.block_size))
        if self.attention == "gather" or (self.attention == "auto" and (not kernel or self.compile is not None)):
            return "gather"
        return "kernel" if kernel else "pool"

    def _run(self, model, st, cache, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, N, C, use_graphs, prev_experts,
             forced_lengths, MB, blocks, per_block, seq_blocks):
        device = prompt_ids.device
        bs = self.block_size
        S = st.S
        trash = -(-S // bs)  # blocks 0..trash-1: where idle slots write
        lengths = prompt_mask.long().sum(-1)
        mask_dtype = self._mask_dtype(model)
        if self.compile or cache.attention != "gather":
            # compile: one shape. pool / kernel: attention reads each slot to its own length, so
            # `kv_len` only sizes the mask it does not read; one length means one graph per width,
            # not ~16 (captured again after every policy update: 0.32 of a 6.3 s GRPO step at 256 tokens)
            bucket = MB * bs
        elif self.auto_bucket:
            bucket = max(bs, _round_up(-(-MB * bs // 16), bs))
        else:
            bucket = _round_up(self.kv_bucket, bs)
        kv_len_for = lambda longest: min(MB * bs, _round_up(max(longest, 1), bucket))  # noqa: E731

        # -- per-call inputs --
        eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
        st.eos_mask.zero_()
        st.eos_mask[eos[(eos >= 0) & (eos < st.eos_mask.numel())]] = True
        st.pad.fill_(pad_token_id)
        st.temperature.fill_(params.temperature if not params.greedy else 1.0)
        st.top_p_value.fill_(params.top_p)
        st.min_new.fill_(self.min_new_tokens)
        st.C.fill_(C)
        forced = forced_lengths is not None
        sample_force = _check_forced(forced_lengths, N, C).to(device) if forced else None
        if forced:
            st.force_mask.zero_()[_forced_token(eos, st.force_mask.numel())] = True
        st.force_len.fill_(C + 1)
        st.out_ids.fill_(pad_token_id)
        st.out_logp.zero_()
        st.done.fill_(True)
        st.row.copy_(N * C + torch.arange(S, device=device))  # idle slots write to their own dummy cell
        st.pos.zero_()
        st.gen.zero_()
        st.tok.zero_()
        st.block_table.zero_()
        st.write_trash.copy_(torch.arange(S, device=device))
        mode = sampling_mode(params, forced)
        min_new = self.min_new_tokens > 0
        step_fn = self._step_fn()

        # -- host bookkeeping --
        waiting = collections.deque((i, 0) for i in range(N))  # (sample, tokens already sampled)
        free_blocks = list(range(blocks - 1, trash - 1, -1))  # pop() hands out low ids first
        slot_blocks: list[list[int]] = [[] for _ in range(S)]
        table = torch.zeros(S, MB, dtype=torch.long)  # host copy of st.block_table, sent once per round
        slot_sample = [-1] * S
        slot_pos = [0] * S  # next KV index each slot writes (exact at every sync)
        slot_gen = [0] * S
        admitted_at = [0] * S
        host_lengths = lengths.tolist()
        stats = dict(replays=0, slot_steps=0, admitted=0, preempted=0, prefill_tokens=0, prefills=0, prefill_chunked=0,
                     max_live=0, compactions=0)
        compact = self._compacts
        clock = _Clock(device if self.timing else None)
        t_prefill = t_capture = t_decode = 0.0
        k = self.sync_every
        need_blocks = lambda s, steps: min(seq_blocks, -(-(slot_pos[s] + steps) // bs))  # noqa: E731
        tick = 0
        kv_lens: set[int] = set()  # attention lengths decoded with (one graph each per width)
        # with `timing`: each round of replays as [steps, live slots, their KV tokens at its start, seconds],
        # so a run can split a decode step into a fixed part and a part per KV byte read (bench_grpo.py)
        rounds: list[list] = []

        def set_table(s):
            table[s].zero_()
            table[s, : len(slot_blocks[s])] = torch.tensor(slot_blocks[s], dtype=torch.long)

        def grow(s, steps):
            want = need_blocks(s, steps) - len(slot_blocks[s])
            if want > 0:
                slot_blocks[s].extend(free_blocks.pop() for _ in range(want))
                set_table(s)

        def drop(s):
            free_blocks.extend(reversed(slot_blocks[s]))
            slot_blocks[s] = []
            slot_sample[s] = -1

        experts = self.decode_experts
        swap_experts = experts != "policy" and prev_experts is not None and _has_experts(model)
        if experts == "policy" and use_graphs:
            raise ValueError("decode_experts: 'policy' is not graph-safe; set cuda_graphs: false")

        def decode_impl(on: bool):
            if not swap_experts:
                return
            if on:
                decode_experts.register()
                model.set_experts_implementation(decode_experts.NAME)
                decode_experts.set_decode_mode(model, experts)
            else:
                model.set_experts_implementation(prev_experts)

        with seeded_rng(params.seed, device):
            while True:
                live = [s for s in range(S) if slot_sample[s] >= 0]
                # 1. blocks for the next k steps of every live slot; preempt the newest if short
                growth = lambda: sum(max(0, need_blocks(s, k) - len(slot_blocks[s])) for s in live)  # noqa: E731
                while live and growth() > len(free_blocks):
                    victim = max(live, key=lambda s: admitted_at[s])
                    waiting.appendleft((slot_sample[victim], slot_gen[victim]))
                    drop(victim)
                    st.done[victim] = True
                    st.row[victim] = N * C + victim
                    live.remove(victim)
                    stats["preempted"] += 1
                for s in live:
                    grow(s, k)
                # 2. admit waiting samples into free slots while blocks last; with `admit_batch`, only once
                # that many slots are free (or all that wait fit, or nothing is decoding)
                admit = []
                free_slots = [s for s in range(S) if slot_sample[s] < 0]
                if live and len(free_slots) < min(self.admit_batch, len(waiting)):
                    free_slots = []
                while waiting and free_slots:
                    i, g = waiting[0]
                    total = host_lengths[i] + g
                    want = min(seq_blocks, -(-(total + k) // bs))
                    if want > len(free_blocks):
                        break
                    waiting.popleft()
                    s = free_slots.pop(0)
                    slot_sample[s], slot_pos[s], slot_gen[s] = i, total, g
                    tick += 1
                    admitted_at[s] = tick
                    slot_blocks[s] = [free_blocks.pop() for _ in range(want)]
                    set_table(s)
                    admit.append((s, i, g))
                st.block_table.copy_(table)
                if admit:
                    clock()
                    decode_impl(False)
                    stats["prefill_chunked"] += self._prefill(st, model, admit, prompt_ids, prompt_mask, C, mask_dtype, mode,
                                                              min_new, sample_force, N, host_lengths)
                    decode_impl(True)
                    stats["admitted"] += len(admit)
                    stats["prefills"] += 1
                    stats["prefill_tokens"] += sum(host_lengths[i] + g for _, i, g in admit)
                    if self.timing:
                        t_prefill += clock()
                    if self.compile == "reduce-overhead" and not st.static_marked:
                        for t in (*vars(st).values(), *cache.keys, *cache.values):
                            if isinstance(t, torch.Tensor):
                                torch._dynamo.mark_static_address(t)
                        st.static_marked = True
                live = [s for s in range(S) if slot_sample[s] >= 0]
                if not live:
                    if waiting:
                        raise RuntimeError("paged engine: no slot could be filled (pool accounting bug)")
                    break
                stats["max_live"] = max(stats["max_live"], len(live))
                # 3. k decode steps (rows admitted with a finished first token just idle). Once nothing
                # waits, the live sequences move to the first slots and a narrower step runs: moving a
                # sequence is moving its block-table row, its KV stays where it is.
                if not waiting and compact:
                    width = self._compact(st, live, S, slot_blocks, slot_sample, slot_pos, slot_gen, admitted_at, table)
                    live = [s for s in range(S) if slot_sample[s] >= 0]
                    st.block_table.copy_(table)
                    stats["compactions"] += width < stats.setdefault("_width", S)
                    stats["_width"] = width
                else:
                    width = S
                view = self._view(st, width)
                if C > 1:
                    kv_len = kv_len_for(max(slot_pos[s] for s in live) + k)
                    kv_lens.add(kv_len)
                    if use_graphs and (width, kv_len, mode) not in st.graphs:
                        clock()
                        self._capture_paged(st, view, model, (width, kv_len, mode), mask_dtype, step_fn)
                        if self.timing:
                            t_capture += clock()
                    else:
                        clock()
                    for _ in range(k):
                        if use_graphs:
                            st.graphs[(width, kv_len, mode)].replay()
                        else:
                            cache.kv_len = kv_len
                            step_fn(view, model, mode, mask_dtype)
                    stats["replays"] += k
                    stats["slot_steps"] += k * width
                    if self.timing:
                        seconds = clock()
                        t_decode += seconds
                        rounds.append([k, len(live), sum(slot_pos[s] for s in live), seconds])
                # 4. sync: which slots finished, where each stands
                done, gen, pos = torch.stack([st.done.long(), st.gen, st.pos.view(-1)]).tolist()
                for s in live:
                    slot_gen[s], slot_pos[s] = gen[s], pos[s]
                    if done[s]:
                        drop(s)
        decode_impl(False)

        out_ids = st.out_ids[: N * C].view(N, C)
        mask, truncated = completion_mask_from_ids(out_ids, eos_token_id)
        width = int(mask.sum(-1).max()) if N else 0
        completion_ids = out_ids[:, :width].masked_fill(mask[:, :width] == 0, pad_token_id)
        mask = mask[:, :width]
        logprobs = (st.out_logp[: N * C].view(N, C)[:, :width] * mask) if self.return_logprobs else None
        tokens = int(mask.sum())
        slot_steps = stats["slot_steps"]
        stats.pop("_width", None)
        if cache.absmax is not None:
            stats["kv_absmax"] = float(cache.absmax)
            cache.absmax = None
            if stats["kv_absmax"] > FP8_MAX and not self._warned_saturation:
                self._warned_saturation = True
                log.warning("kv_dtype fp8: prefilled K/V values reach %.0f, past fp8's ±%.0f; they saturate (kv_dtype: auto "
                            "keeps them)", stats["kv_absmax"], FP8_MAX)
        if stats["preempted"] and not self._warned_preemption:
            # designed behaviour, but it costs: at 8,192 tokens on an H200, 36 of 128 rows preempted cost ~12 % of
            # the decode (docs/benchmarks.md, session 15)
            self._warned_preemption = True
            log.warning("paged engine: the KV pool (%.1f GiB, %d slots) could not hold every live sequence: %d were "
                        "preempted and prefilled again later (logged as rollout/preempted). kv_dtype: fp8, a larger "
                        "kv_cache_gib / kv_memory_fraction, or fewer samples per step avoid it",
                        cache.nbytes() / 2**30, S, stats["preempted"])
        self.last_stats = dict(stats, steps=stats["replays"], graphs=len(st.graphs), kv_lens=len(kv_lens), kv_bytes=cache.nbytes(),
                               kv_blocks=blocks, kv_block_bytes=per_block, slots=S, tokens=tokens,
                               idle_slot_fraction=(1 - (tokens - stats["admitted"]) / slot_steps) if slot_steps else 0.0,
                               prefill_s=t_prefill if self.timing else None,
                               capture_s=t_capture if self.timing else None,
                               decode_s=t_decode if self.timing else None, decode_rounds=rounds if self.timing else None)
        return Rollout(prompt_ids, prompt_mask, completion_ids.clone(), mask.clone(), truncated,
                       logprobs.clone() if logprobs is not None else None)

    SLOT_BUFFERS = ("tok", "pos", "gen", "row", "done", "block_table", "write_trash", "logits", "force_len")

    @classmethod
    def _view(cls, st, width: int):
        """The state with its per-slot buffers narrowed to the first `width` slots (views: same memory)."""
        if width not in st.views:
            view = _PagedState()
            view.__dict__.update(st.__dict__)
            for name in cls.SLOT_BUFFERS:
                setattr(view, name, getattr(st, name)[:width])
            st.views[width] = view
        view = st.views[width]
        view.dummy_base = st.dummy_base
        return view

    def _compact(self, st, live, S, slot_blocks, slot_sample, slot_pos, slot_gen, admitted_at, table) -> int:
        """Move the live slots into 0..len(live)-1; return the width to decode with (a power of two)."""
        width = min(S, 1 << max(len(live) - 1, 0).bit_length())
        movers = [s for s in live if s >= len(live)]
        holes = [t for t in range(len(live)) if slot_sample[t] < 0]
        if movers:
            src = torch.tensor(movers, device=st.tok.device)
            dst = torch.tensor(holes[: len(movers)], device=st.tok.device)
            for name in ("tok", "pos", "gen", "row", "done", "force_len"):
                buf = getattr(st, name)
                buf[dst] = buf[src].clone()
            st.done[src] = True
            for s, t in zip(movers, holes):
                for lst in (slot_blocks, slot_sample, slot_pos, slot_gen, admitted_at):
                    lst[t], lst[s] = lst[s], lst[t]
                table[t] = table[s]
                table[s] = 0
        return width

    def _new_paged_state(self, model, S, MB, blocks, C, N, device) -> _PagedState:
        st = _PagedState()
        st.model = model
        layers, heads, head_dim, dtype = self._kv_shape(model, device, self.kv_dtype)
        st.cache = PagedKV(layers, blocks * self.block_size, heads, head_dim, dtype, device, self.block_size)
        V = model.get_output_embeddings().weight.shape[0]
        long = dict(dtype=torch.long, device=device)
        st.tok = torch.zeros(S, 1, **long)  # token each slot feeds at the next step
        st.pos = torch.zeros(S, 1, **long)  # its position = the KV index it writes
        st.gen = torch.zeros(S, **long)  # completion tokens the slot's sample has so far
        st.row = torch.zeros(S, **long)  # out index base (sample * C) or the slot's dummy cell
        st.done = torch.ones(S, dtype=torch.bool, device=device)  # idle or finished
        st.block_table = torch.zeros(S, MB, **long)
        st.write_trash = torch.arange(S, **long)
        st.offsets = torch.arange(self.block_size, **long)
        st.arange = torch.arange(MB * self.block_size, **long)
        st.logits = torch.zeros(S, V, dtype=torch.float32, device=device)
        st.temperature = torch.ones((), device=device)
        st.top_p_value = torch.ones((), device=device)
        st.min_new = torch.zeros((), **long)
        st.C = torch.zeros((), **long)
        st.pad = torch.zeros((), **long)
        st.eos_mask = torch.zeros(V, dtype=torch.bool, device=device)
        st.force_len = torch.zeros(S, **long)
        st.force_mask = torch.zeros(V, dtype=torch.bool, device=device)
        st.out_ids = torch.zeros(N * C + S, **long)
        st.out_logp = torch.zeros(N * C + S, dtype=torch.float32, device=device)
        return st

    def _prefill(self, st, model, admit, prompt_ids, prompt_mask, C, mask_dtype, mode, min_new, sample_force, N, host_lengths):
        """Prefill the admitted (slot, sample, tokens already sampled) rows into their slots and draw
        each one's next token. Eager, the policy's own experts (host syncs are fine here). Returns how
        many rows went in chunks.

        Memory stays bounded whatever the lengths: rows of up to `prefill_chunk` tokens go through in
        left-padded groups of at most 4 x `prefill_chunk` padded tokens; a longer row (a preempted
        sequence re-admitted with thousands of sampled tokens) goes alone, `prefill_chunk` tokens at a
        time, each chunk attending to what the earlier ones wrote to its blocks. One forward over an
        8 k-token row with a dense [rows, 1, W, W] mask ran an H200 out of memory beside the KV pool."""
        device = prompt_ids.device
        chunk = self.prefill_chunk
        sizes = [host_lengths[i] + g for _, i, g in admit]
        order = sorted(range(len(admit)), key=lambda a: -sizes[a])  # similar widths together
        groups: list[list[int]] = []
        for a in (a for a in order if sizes[a] <= chunk):
            if not groups or (len(groups[-1]) + 1) * sizes[groups[-1][0]] > 4 * chunk:
                groups.append([])
            groups[-1].append(a)
        logits = [None] * len(admit)
        for a in (a for a in order if sizes[a] > chunk):
            logits[a] = self._prefill_chunked(st, model, admit[a], prompt_ids, prompt_mask, C, N, chunk, mask_dtype)
        for group in groups:
            rows = self._prefill_rows(st, model, [admit[a] for a in group], prompt_ids, prompt_mask, C, N, mask_dtype)
            for a, row in zip(group, rows):
                logits[a] = row
        slots = torch.tensor([s for s, _, _ in admit], device=device)
        samples = torch.tensor([i for _, i, _ in admit], device=device)
        # the admitted slots' state, then their first draw (the other slots are left untouched)
        st.pos[slots] = torch.tensor(sizes, device=device)[:, None]
        st.gen[slots] = torch.tensor([g for _, _, g in admit], device=device)
        st.row[slots] = samples * C
        st.force_len[slots] = sample_force[samples] if sample_force is not None else C + 1
        st.done[slots] = False
        st.logits[slots] = torch.stack(logits)
        live = torch.zeros_like(st.done)
        live[slots] = True
        self._draw_into(st, mode, live, min_new)
        return sum(size > chunk for size in sizes)  # rows prefilled in chunks

    @staticmethod
    def _sequence(st, admitted, prompt_ids, prompt_mask, C, N):
        """A sample's real prompt tokens followed by the tokens it sampled before it was preempted."""
        _, i, g = admitted
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        return torch.cat([prompt, st.out_ids[: N * C].view(N, C)[i, :g]]) if g else prompt

    def _prefill_rows(self, st, model, admit, prompt_ids, prompt_mask, C, N, mask_dtype):
        """One forward over the rows left-padded to the longest; attention over the rows themselves.
        Returns each row's last-position logits [n, V]."""
        device = prompt_ids.device
        bs = self.block_size
        rows = [self._sequence(st, a, prompt_ids, prompt_mask, C, N) for a in admit]
        W = max(r.numel() for r in rows)
        ids = torch.stack([torch.nn.functional.pad(r, (W - r.numel(), 0)) for r in rows])
        mask = torch.stack([torch.nn.functional.pad(torch.ones_like(r), (W - r.numel(), 0)) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & mask.bool()[:, None, :]
        allowed |= torch.eye(W, dtype=torch.bool, device=device)[None]
        cache = st.cache
        slots = torch.tensor([s for s, _, _ in admit], device=device)
        dest = st.block_table[slots].gather(1, positions // bs) * bs + positions % bs
        cache.sel = mask.flatten().nonzero().squeeze(1)
        cache.dest = dest.flatten()[cache.sel]
        cache.prefill, cache.kv_len = True, W
        try:
            return self._forward(model, ids, self._mask(allowed[:, None], mask_dtype), positions, cache, keep_last=True)
        finally:
            cache.prefill = False

    def _prefill_chunked(self, st, model, admitted, prompt_ids, prompt_mask, C, N, chunk, mask_dtype):
        """One row, `chunk` tokens per forward: each chunk writes its K/V to the slot's blocks and
        attends (gathered, SDPA) to the slot's positions up to its own. Returns the last logits [V]."""
        device = prompt_ids.device
        bs = self.block_size
        s = admitted[0]
        seq = self._sequence(st, admitted, prompt_ids, prompt_mask, C, N)
        cache = st.cache
        attention, cache.attention = cache.attention, "gather"  # several query tokens: the gather path
        table = st.block_table[s]
        try:
            for start in range(0, seq.numel(), chunk):
                pos = torch.arange(start, min(start + chunk, seq.numel()), device=device)
                kv_len = _round_up(int(pos[-1]) + 1, bs)
                cache.write = table[pos // bs] * bs + pos % bs
                cache.read = (table[: kv_len // bs, None] * bs + torch.arange(bs, device=device)).view(1, kv_len)
                cache.prefill, cache.kv_len = False, kv_len
                allowed = torch.arange(kv_len, device=device)[None, :] <= pos[:, None]  # [q, kv_len]
                logits = self._forward(model, seq[pos][None], self._mask(allowed[None, None], mask_dtype), pos[None], cache,
                                       keep_last=True)
        finally:
            cache.attention = attention
        return logits[0]

    def _draw_into(self, st, mode, live, min_new):
        """Draw every live slot's next token into its sample's output cell; advance gen, done, tok."""
        nxt, logp = draw(st, mode, st.gen, st.force_len, min_new)
        cell = torch.where(live, st.row + st.gen, st.write_trash + st.dummy_base)
        st.out_ids.index_copy_(0, cell, nxt)
        st.out_logp.index_copy_(0, cell, logp)
        finished = st.eos_mask[nxt] | (st.gen + 1 >= st.C)
        st.done |= live & finished
        st.gen.add_(live.long())
        st.tok.copy_(torch.where(live[:, None], nxt[:, None], st.tok))

    def _decode_step(self, st, model, mode, mask_dtype):
        """One decode step for every slot over static buffers (the body captured in a graph)."""
        cache = st.cache
        bs = self.block_size
        kv = cache.kv_len
        live = ~st.done
        write = st.block_table.gather(1, st.pos // bs) * bs + st.pos % bs  # [S, 1]
        cache.write = torch.where(live, write.view(-1), st.write_trash)
        extra = {}
        if cache.attention != "gather":  # attention reads the pool through the table, each slot to its own length
            cache.table = st.block_table
            cache.lengths = (st.pos.view(-1) + 1).clamp(max=kv)
            extra["paged_kv"] = cache
        else:
            nb = kv // bs
            cache.read = (st.block_table[:, :nb, None] * bs + st.offsets).view(-1, nb * bs)
        cache.prefill = False
        allowed = st.arange[:kv][None] <= st.pos  # [S, kv]: the slot's own tokens only
        mask4d = self._mask(allowed[:, None, None, :], mask_dtype)
        logits = self._forward(model, st.tok, mask4d, st.pos, cache, **extra)
        st.logits.copy_(logits)
        st.pos.add_(live.long()[:, None])
        self._draw_into(st, mode, live, self.min_new_tokens > 0)

    def _capture_paged(self, st, view, model, key, mask_dtype, step_fn):
        _, kv_len, mode = key
        st.cache.kv_len = kv_len
        bufs = (st.tok, st.pos, st.gen, st.done, st.out_ids, st.out_logp)
        snapshot = [t.clone() for t in bufs]
        # the warm-up must not write real KV: every slot idle while it runs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), rng_untouched():
            for _ in range(2):
                for t, s in zip(bufs, snapshot):
                    t.copy_(s)
                st.done.fill_(True)
                step_fn(view, model, mode, mask_dtype)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(bufs, snapshot):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=st.pool):
            step_fn(view, model, mode, mask_dtype)
        st.pool = graph.pool()
        st.graphs[key] = graph
        for t, s in zip(bufs, snapshot):  # capture only records kernels; restore anyway
            t.copy_(s)
