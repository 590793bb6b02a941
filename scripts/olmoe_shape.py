"""The OLMoE-1B-7B shape every GPU benchmark uses (random init; 6.9 B parameters at 16 layers).

Each script adds its own settings on top (token ids, router logits, attention implementation); the
shape itself lives here only. Source: allenai/OLMoE-1B-7B-0924's config.json.
"""

OLMOE_1B_7B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,  # per expert
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
)
