"""The reference's host offload on CUDA frees its weights' device memory and brings back the same
weights (`pytest -m gpu`; skipped without CUDA)."""

import pytest
import torch

from r1lightning import offload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_offload_frees_the_reference_and_restores_it_exactly(tiny_moe_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_moe_config, hidden_size=256, moe_intermediate_size=256, intermediate_size=512, vocab_size=4096)
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 4096, (2, 64), device="cuda")
    with torch.no_grad():
        before = ref(input_ids=ids).logits
    assert offload.unsupported(ref) is None
    moved = offload.HostOffload(ref)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    moved.to_host()
    torch.cuda.synchronize()
    freed = allocated - torch.cuda.memory_allocated()
    assert abs(freed - offload.parameter_bytes(ref)) < 0.01 * offload.parameter_bytes(ref)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in ref.parameters())
    moved.to_device()
    with torch.no_grad():
        after = ref(input_ids=ids).logits
    assert torch.equal(after, before)
