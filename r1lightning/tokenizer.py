"""The embedded default tokenizer: one token per character, built offline with `tokenizers`.

Deterministic (the vocabulary is a fixed list), so two machines build byte-identical files, and
saved with `save_pretrained` it loads in plain transformers through `AutoTokenizer`, which reads
`tokenizer_class` from `tokenizer_config.json` (`TokenizersBackend`, transformers 5's name for
`PreTrainedTokenizerFast`: the backend built from `tokenizer.json` as saved).

Exception: transformers (5.24 at least) ignores the declared class for some model types it lists as
having wrong hub tokenizer classes, `qwen2` among them, and builds `Qwen2Tokenizer`, which replaces
the character pre-tokenizer (spaces are dropped). `load_tokenizer` (what the project uses) loads the
declared class in that case; `check_autotokenizer` tells at export time when plain `AutoTokenizer`
would not give the same token ids. The quickstart's dense student is a Llama for that reason.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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


# Classes that mean "the tokenizer.json backend as saved".
_BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
PROBE = "<|user|>What is 457 + 386?<|end|><|assistant|><think>7+6=13\n</think><answer>843</answer><|end|>"


def declared_class(directory) -> str | None:
    """`tokenizer_class` of a local tokenizer directory's tokenizer_config.json, if any."""
    import json
    from pathlib import Path

    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_tokenizer(name, **kwargs):
    """`AutoTokenizer.from_pretrained`, except that a directory declaring the backend class
    (`TokenizersBackend` / `PreTrainedTokenizerFast`) gets that class even where transformers
    substitutes its model type's own class (see the module docstring)."""
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    if declared_class(name) in _BACKEND_CLASSES and type(tok).__name__ not in _BACKEND_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(name, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})
    return tok


def check_autotokenizer(tokenizer, directory) -> str | None:
    """None if plain `AutoTokenizer.from_pretrained(directory)` encodes like `tokenizer`; else one
    line saying what it loads instead and how to load the right one."""
    import transformers

    try:
        loaded = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # any failure means a plain user cannot load it either
        return f"AutoTokenizer.from_pretrained fails on this export ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if loaded(PROBE, add_special_tokens=False)["input_ids"] == tokenizer(PROBE, add_special_tokens=False)["input_ids"]:
        return None
    return (f"transformers {transformers.__version__} loads this tokenizer as {type(loaded).__name__} for this model type, which "
            f"encodes differently; load it with PreTrainedTokenizerFast.from_pretrained (r1lightning does)")
