"""Host offload on CUDA frees the device memory of what it moves and brings back the same values
(`pytest -m gpu`; skipped without CUDA)."""

import pytest
import torch

from r1lightning import offload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _freed_by(moved) -> int:
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    moved.to_host()
    torch.cuda.synchronize()
    return allocated - torch.cuda.memory_allocated()


def _reference(tiny_moe_config):
    """A bf16 MoE reference on the GPU, a batch of ids, and its logits on them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_moe_config, hidden_size=256, moe_intermediate_size=256, intermediate_size=512, vocab_size=4096)
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 4096, (2, 64), device="cuda")
    with torch.no_grad():
        before = ref(input_ids=ids).logits
    return ref, ids, before


def test_offload_frees_the_reference_and_the_optimizer_state_and_restores_them_exactly(tiny_moe_config):
    from r1lightning.optim import MasterWeightAdamW

    ref, ids, before = _reference(tiny_moe_config)
    params = list(ref.parameters())
    assert offload.unsupported(params) is None
    moved = offload.HostOffload.of_module(ref)
    freed = _freed_by(moved)
    assert abs(freed - offload.nbytes(params)) < 0.01 * offload.nbytes(params)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in ref.parameters())
    moved.to_device()
    with torch.no_grad():
        after = ref(input_ids=ids).logits
    assert torch.equal(after, before)

    opt = MasterWeightAdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = offload.optimizer_state_tensors(opt)
    snapshot = [t.clone() for t in state]
    moved = offload.HostOffload(state, "the optimizer state")
    freed = _freed_by(moved)
    assert abs(freed - offload.nbytes(state)) < 0.01 * offload.nbytes(state)  # fp32 master + two moments
    moved.to_device()
    assert all(torch.equal(t, s) for t, s in zip(offload.optimizer_state_tensors(opt), snapshot))
    opt.step()  # the optimizer runs on the restored tensors


def test_background_copy_back_runs_beside_other_work_and_gives_the_same_values(tiny_moe_config):
    """`to_device(background=True)` copies on a side stream while the current stream works; after `wait()` the
    reference computes exactly what it did, and parking it again frees its device memory without a copy."""
    ref, ids, before = _reference(tiny_moe_config)
    moved = offload.HostOffload.of_module(ref)
    moved.to_host()
    copied = moved.copied_bytes
    x = torch.randn(4096, 4096, device="cuda")
    moved.to_device(background=True)
    for _ in range(20):  # the current stream is busy while the copy runs on the side stream
        x = torch.tanh(x @ x)
    moved.wait()
    with torch.no_grad():
        after = ref(input_ids=ids).logits
    assert torch.equal(after, before)
    assert abs(_freed_by(moved) - offload.nbytes(list(ref.parameters()))) < 0.01 * offload.nbytes(list(ref.parameters()))
    assert moved.copied_bytes == copied  # unchanged weights: parked again without a copy
