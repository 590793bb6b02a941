"""The embedded default tokenizer: one token per character, built offline with `tokenizers`.

Deterministic (the vocabulary is a fixed list), so two machines build byte-identical files, and
saved with `save_pretrained` it loads in plain transformers through `AutoTokenizer`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
# R1's reasoning and answer tags are single tokens so a trace costs one token per character of content.
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]
# Only the first seven are dropped by decode(skip_special_tokens=True).

# Every message ends with <|end|>; the assistant header is the generation prompt, so the completion
# the policy samples is "<think>...</think><answer>...</answer><|end|>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_vocabulary() -> list[str]:
    """Special tokens first, then printable ASCII (space included) and newline."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c\t"]
    return SPECIAL_TOKENS + chars


def build_char_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(char_vocabulary())}
    # A BPE model without merges maps every character to its own token (unknown characters to UNK,
    # one each); special tokens are matched before it runs. It is linear in the text length, where a
    # WordLevel model behind an empty-pattern `Split` pre-tokenizer gives the same ids but grew
    # quadratically (6.7 ms for a 1,300-character trace against 0.2 ms; traces of R1 length matter).
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS[:7])
    # The reasoning tags are whole tokens but not "special": they survive skip_special_tokens=True.
    backend.add_tokens(SPECIAL_TOKENS[7:])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def load_tokenizer(name: str, **kwargs):
    """`AutoTokenizer.from_pretrained`, except for directories whose tokenizer is a plain `tokenizers`
    one (the embedded char tokenizer): transformers 5 then picks the class from the model config
    beside it (e.g. Qwen2Tokenizer for qwen2 / qwen3_moe), whose byte-level pre-tokenizer drops every
    space; the class the tokenizer was saved as loads it unchanged."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    config = Path(name).expanduser() / "tokenizer_config.json"
    if config.is_file():
        saved_as = json.loads(config.read_text()).get("tokenizer_class")
        if saved_as in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(name, **kwargs)
    return AutoTokenizer.from_pretrained(name, **kwargs)
