import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_MOE = dict(
    model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
    router_aux_loss_coef=0.01, max_position_embeddings=256, tie_word_embeddings=True,
)


@pytest.fixture
def tiny_moe_config():
    return dict(TINY_MOE)


@pytest.fixture
def char_tokenizer():
    from r1lightning.tokenizer import build_char_tokenizer

    return build_char_tokenizer()
