"""Tiny random MoE configs of each supported architecture (tests, parity checks, smoke runs)."""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0, output_router_logits=True, router_aux_loss_coef=0.01)

TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, intermediate_size=96, head_dim=16, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(_COMMON, model_type="olmoe", num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                  num_key_value_heads=4),
    "mixtral": dict(_COMMON, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=32),
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=32,
                        intermediate_size=96, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
}


def tiny_moe_model(kind: str, dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[kind], **overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # routers start at zero in some models: give them signal so routing is uneven
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("gate" in name or "router" in name or "experts" in name):
                p.normal_(0.0, 0.1)
    return model
