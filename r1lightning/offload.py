"""The frozen reference's weights and the optimizer's state in pinned host memory when they are not needed.

A GRPO step holds on the GPU: the policy, the frozen reference (a second copy of the weights, used only in
the reference pass, for the KL term), the optimizer's state (AdamW's two moments, with `MasterWeightAdamW`
also fp32 master weights; used only in the update), and while it samples the KV cache, in the update the
gradients and activations. For the OLMoE-1B-7B shape the reference is 12.9 GiB of bf16 weights and the
moments 25.8 GiB (51.6 GiB in fp32); 16 prompts x G 8 x 4,224 tokens of KV are 66 GiB.

`StepOffloads` (mixed into `GRPOModule`) parks the reference on the host after each reference pass, so the
update's micro-batches get its room, and copies it back on a side stream while the policy samples
(`HostOffload.to_device(background=True)`). When the step's KV at full length would not fit the sampler's
budget with it on the device (`PagedSampler`: `kv_memory_fraction` of the free memory), it stays on the
host through sampling and comes back after; the optimizer state then joins it there if the KV still does
not fit. A pool capped by free memory (8k+ tokens) then holds more sequences before it must preempt.

Cost: a tensor's host copy stays valid until something writes it (its version counter tells), so the
frozen reference is parked without a copy until a `ReferenceModelRefresh`; the optimizer state changes
every step and is copied both ways each step it moves. What comes back is a host-to-device copy (12.9 GiB of
reference at ~50 GB/s: ~0.3 s on an H200), beside the rollout or, when the rollout needed the room, after it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from r1lightning.errors import UserError
from r1lightning.rollout.paged import kv_bytes_per_token

log = logging.getLogger(__name__)


def parse_setting(value, key: str = "offload_reference") -> str | bool:
    """`auto`, true or false (YAML), with a one-line error naming the key."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        value = value.lower() if value.lower() == "auto" else value.lower() == "true"
    if not (value == "auto" or isinstance(value, bool)):
        raise UserError(f"model.init_args.{key}: expected auto, true or false, got {value!r}")
    return value


def unsupported(tensors: list[Tensor], what: str = "it") -> str | None:
    """Why `HostOffload` cannot move these tensors (None when it can)."""
    if not tensors:
        return f"{what} holds no tensors"
    if any(hasattr(t, "placements") for t in tensors):  # DTensor: FSDP owns where the shards live
        return f"{what} is sharded (FSDP2 has its own cpu_offload)"
    if tensors[0].device.type != "cuda":
        return f"{what} is on {tensors[0].device.type}, not CUDA"
    return None


def optimizer_state_tensors(optimizer) -> list[Tensor]:
    """The per-parameter state an optimizer keeps between steps (AdamW: the moments; MasterWeightAdamW:
    also the fp32 master weights), without the scalar step counters."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
    out, seen = [], set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.numel() > 1 and id(value) not in seen:
                seen.add(id(value))
                out.append(value)
    return out


def nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class HostOffload:
    """Move tensors (a frozen module's parameters, an optimizer's state) to pinned host memory and back,
    in place (`t.data`), so every holder (modules, the optimizer) sees the move.

    Nothing else may hold the tensors' device storage: it is freed on `to_host`. The host copy of a
    tensor not written since its last copy (its version counter) is reused without copying; in-place
    ops (`copy_`, `lerp_`, optimizers' updates, `load_state_dict`) count as writes, writes through
    `t.data` would not (nothing in the project writes that way)."""

    def __init__(self, tensors: list[Tensor], what: str = "the reference"):
        reason = unsupported(tensors, what)
        if reason:
            raise UserError(f"cannot offload {what}: {reason}")
        self.tensors = list(tensors)
        self.what = what
        self.device = self.tensors[0].device
        self.host: list[Tensor | None] = [None] * len(self.tensors)
        self.versions: list[int | None] = [None] * len(self.tensors)  # at the last host copy
        self.on_host = False
        self.copied_bytes = 0  # to the host, over this object's life (tests, logs)
        self._stream = None  # the side stream of background copies back (created on first use)
        self._ready = None  # recorded there after a background `to_device`; `wait` makes the step wait on it

    @classmethod
    def of_module(cls, module: torch.nn.Module, what: str = "the reference") -> "HostOffload":
        return cls(list(module.parameters()), what)  # tied weights appear once

    def same_tensors(self, tensors: list[Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors))

    def to_host(self) -> None:
        if self.on_host:
            return
        self.wait()  # a background copy back must land before the device copy is read or freed
        self.reserve()
        for i, t in enumerate(self.tensors):
            if self.versions[i] != t._version:  # written since the last copy (or never copied)
                self.host[i].copy_(t.data, non_blocking=True)
                self.copied_bytes += t.numel() * t.element_size()
            t.data = self.host[i]  # the device tensor is freed once the copy above has run (stream order)
            self.versions[i] = t._version
        self.on_host = True

    def reserve(self) -> bool:
        """Allocate the pinned host buffer now (once), so the first `to_host` pays only the copy; True when it
        allocated. Pinning is the slow part: 19.7 s for 25.8 GiB on the H200 machine (session 14), where the
        copy into it took 0.5 s. A benchmark calls this before its timed steps, as it compiles before them."""
        if all(h is not None for h in self.host):
            return False
        self._allocate_host()
        return True

    def _allocate_host(self) -> None:
        # One buffer for all: one pinning call (pinned: the copies run asynchronously at full link speed)
        # instead of one per tensor; each tensor a view at a 64-byte aligned offset.
        pin = self.device.type == "cuda"
        sizes = [t.numel() * t.element_size() for t in self.tensors]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // 64) * 64)
        if pin:  # once per run, but tens of seconds for an optimizer's state: say why the step pauses
            log.info("pinning %.1f GiB of host memory for %s (once)", offsets[-1] / 2**30, self.what)
        try:
            buffer = torch.empty(offsets[-1], dtype=torch.uint8, device="cpu", pin_memory=pin)
            self.host = [buffer[o : o + n].view(t.dtype).view(t.shape) for t, o, n in zip(self.tensors, offsets, sizes)]
        except RuntimeError as err:
            self.host = [None] * len(self.tensors)
            key = "offload_reference" if self.what == "the reference" else "offload_optimizer"
            raise UserError(f"model.init_args.{key}: cannot hold {self.what} in host memory "
                            f"({nbytes(self.tensors) / 2**30:.1f} GiB{', pinned' if pin else ''}): "
                            f"{str(err).splitlines()[0]}; set it to false") from None

    def to_device(self, background: bool = False) -> None:
        """Back to the device. `background`: copy on a side stream, so the copy runs beside what the
        current stream does next (the rollout); `wait()` before anything reads the tensors. The device
        memory comes from the current stream's pool, so once freed again it serves that stream's work."""
        if not self.on_host:
            return
        background = background and self.device.type == "cuda"  # elsewhere the copy just runs now
        main = torch.cuda.current_stream(self.device) if background else None
        if background:
            self._stream = self._stream or torch.cuda.Stream(self.device)
            self._stream.wait_stream(main)  # the blocks handed out may still be read by queued work
        for i, t in enumerate(self.tensors):
            dev = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            if background:
                with torch.cuda.stream(self._stream):
                    dev.copy_(self.host[i], non_blocking=True)
                dev.record_stream(self._stream)  # freed later: not reused before this copy ran
            else:
                dev.copy_(self.host[i], non_blocking=True)
            t.data = dev
            self.versions[i] = t._version
        self._ready = self._stream.record_event() if background else None
        self.on_host = False

    def wait(self) -> None:
        """The current stream waits for a background `to_device` (nothing when there was none)."""
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None


def plan_offload(reference_setting, optimizer_setting, reference: list[Tensor], optimizer: list[Tensor],
                 kv_need: int, kv_budget: float | None, fraction: float = 1.0,
                 reference_parked: bool = False) -> tuple[bool, bool]:
    """(offload the reference, offload the optimizer state) for one rollout.

    `kv_need`: the step's KV at full length. `kv_budget`: what the sampler's KV could have with both on
    the device (None: a sampler that does not size its cache from free memory), `fraction` of any
    bytes freed being added to it. `auto` moves the reference when the KV does not fit the budget (or,
    without a budget, is at least the reference's size), then the optimizer state when it still does
    not fit (never without a budget). True / false: always / never; true on something that cannot move
    is an error naming the key. `reference_parked`: the reference waits on the host now (moved from CUDA
    before), so it can move whatever device its tensors report."""

    def decide(setting, tensors, key, what, fits_without, parked=False):
        if setting is False or not tensors:
            return False
        reason = None if parked else unsupported(tensors, what)  # parked: it moved before, from CUDA
        if setting is True:
            if reason:
                raise UserError(f"model.init_args.{key}: true, but {what} cannot be offloaded: {reason}")
            return True
        return reason is None and not fits_without

    ref_bytes = nbytes(reference) if reference else 0
    fits = kv_need < ref_bytes if kv_budget is None else kv_need <= kv_budget
    move_ref = decide(reference_setting, reference, "offload_reference", "the reference", fits, reference_parked)
    if kv_budget is not None:
        fits_after = kv_need <= kv_budget + fraction * (ref_bytes if move_ref else 0)
    else:
        fits_after = True
    move_opt = decide(optimizer_setting, optimizer, "offload_optimizer", "the optimizer state", fits_after)
    return move_ref, move_opt


class StepOffloads:
    """What a GRPO step keeps on the host, and when (`GRPOModule` mixes this in). Needs `hparams`
    (offload_reference, offload_optimizer), `ref_model`, `model`, `sampler`, `sampling`, `device` and
    `optimizers()` from the module."""

    _offloads: dict  # "reference", "optimizer": HostOffload, kept across steps (set by the module)
    _park_failed = False  # auto, and the host could not pin the reference: it stays on the GPU

    def _offload_of(self, name: str, tensors: list[Tensor]) -> HostOffload:
        """The kept `HostOffload` of `name` ("reference", "optimizer"), new on first use or for new tensors (a resume)."""
        kept = self._offloads.get(name)
        if kept is None or not kept.same_tensors(tensors):
            kept = self._offloads[name] = HostOffload(tensors, f"the {name}")
        return kept

    def _reference_parked(self, tensors: list[Tensor]) -> bool:
        """The reference waits on the host now (moved from CUDA before; `unsupported` would refuse it as a host tensor)."""
        kept = self._offloads.get("reference")
        return kept is not None and kept.on_host and kept.same_tensors(tensors)

    def parked_reference(self) -> HostOffload | None:
        """The reference's host copy when it lives on the host between reference passes (`offload_reference`
        auto or true, on CUDA, unsharded): the update and the rollout get its room; it comes back in the
        background while the rollout runs (or after it, when the rollout needs the room). None otherwise."""
        h = self.hparams
        if self.ref_model is None or h.offload_reference is False or self._park_failed:
            return None
        tensors = list(self.ref_model.parameters())
        if not self._reference_parked(tensors) and unsupported(tensors) is not None:
            return None
        return self._offload_of("reference", tensors)

    def park_reference(self, parked: HostOffload) -> None:
        """The reference to the host for the update; under `auto`, a host that cannot pin it keeps it here."""
        try:
            parked.to_host()
        except UserError as err:
            if self.hparams.offload_reference is True:
                raise
            self._park_failed = True
            log.warning("offload_reference: auto keeps the reference on the GPU: %s", err)

    def rollout_offloads(self, batch) -> dict[str, HostOffload]:
        """What this step's rollout keeps on the host (`offload_reference`, `offload_optimizer`)."""
        h = self.hparams
        reference = list(self.ref_model.parameters()) if self.ref_model is not None else []
        optimizer = []
        if h.offload_optimizer is not False:
            try:
                optimizer = optimizer_state_tensors(self.optimizers())
            except RuntimeError:  # no trainer attached (a step called by hand): no optimizer state to move
                pass
        if not reference and not optimizer:
            return {}
        rows = batch["prompt_ids"].shape[0] * self.sampling.num_samples
        tokens = batch["prompt_ids"].shape[1] + self.sampling.max_new_tokens
        # in the sampler's pool dtype (PagedSampler's kv_dtype; other samplers keep the compute dtype)
        need = rows * tokens * kv_bytes_per_token(self.model, self.device, getattr(self.sampler, "kv_dtype", "auto"))
        # a sampler that sizes its KV from free memory (PagedSampler): what it would get with everything here
        budget = self.sampler.memory_budget(self.device) if hasattr(self.sampler, "memory_budget") else None
        fraction = getattr(self.sampler, "kv_memory_fraction", 1.0)
        parked = bool(reference) and self._reference_parked(reference)
        if budget is not None and parked:  # its bytes count as here: it comes back unless the plan keeps it away
            budget -= fraction * nbytes(reference)
        move_ref, move_opt = plan_offload(h.offload_reference, h.offload_optimizer, reference, optimizer, need, budget, fraction,
                                          reference_parked=parked)
        return {name: self._offload_of(name, tensors)
                for name, move, tensors in (("reference", move_ref, reference), ("optimizer", move_opt, optimizer)) if move}
