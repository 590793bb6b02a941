"""The policy: a Hugging Face causal LM and its tokenizer, from a directory, a hub id or a config.

A `Policy` is a plain description that LightningCLI builds from YAML; the modules call `build()` in
`configure_model`, so nothing heavy happens while a config is parsed or printed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from r1lightning.errors import UserError
from r1lightning.moe import apply_moe_backend
from r1lightning.tokenizer import build_char_tokenizer, check_autotokenizer, load_tokenizer

log = logging.getLogger(__name__)

CHAR_TOKENIZER = "char"  # the embedded character-level tokenizer
# How recipes spell a policy's arguments; errors name the key the user wrote.
KEY = "model.init_args.policy.init_args"


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


class Policy:
    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        moe_backend: str = "auto",
        moe_recompute_activation: bool = False,
        megablocks_kernels: str = "megablocks",
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        revision: str | None = None,
        gradient_checkpointing: bool = False,
        cudnn_attention: bool | str = "auto",
    ):
        """
        Args:
            name_or_path: a local `save_pretrained` directory or a hub id (hub ids need network
                unless cached). Mutually exclusive with `config`.
            config: a transformers config as a dict with `model_type` (e.g. `qwen3_moe`); the model is
                randomly initialised. `vocab_size` and the special token ids default to the tokenizer's.
            tokenizer: a directory, a hub id, or `char` for the embedded tokenizer. Defaults to
                `name_or_path`.
            moe_backend: `auto`, `megablocks`, `grouped_mm` or `eager` (how expert FFNs run).
            moe_recompute_activation: MegaBlocks only: recompute the experts' gated activation in
                backward instead of storing it (less memory).
            megablocks_kernels: MegaBlocks only: `megablocks` (MegaBlocks' permutation kernels and
                grouped_gemm) or `torch` (the same padded layout with torch ops and
                `torch._grouped_mm`, no host wait per layer; not yet timed).
            dtype: weights dtype when loading (`float32`, `bfloat16`, `float16`); mixed precision is
                the trainer's `precision`.
            attn_implementation: passed to transformers (`sdpa`, `eager`, `flash_attention_2`).
            gradient_checkpointing: recompute activations in backward to save memory.
            cudnn_attention: let SDPA pick its cuDNN kernel while this policy trains (CUDA only). cuDNN
                builds an execution plan for every new shape (3.2 ms of CPU per attention call on an
                H200: 2.8 s of a 12 s GRPO step with long-tailed 256-token completions, whose packed
                micro-batches change shape every step), and is otherwise the fastest kernel here (a
                fixed-length 256-token GRPO step with 8,192-token micro-batches: 5.48 s with it, 6.07 s
                without; at 32,768-token micro-batches no gain was visible; 2026-11-30). `auto`:
                GRPO's micro-batches use it when their shape recurred from an earlier step
                (`r1lightning.cudnn_gate`), flash or memory-efficient attention otherwise and in every
                other pass; true: always; false: never.
        """
        if (name_or_path is None) == (config is None):
            raise UserError("policy: give exactly one of `name_or_path` or `config`")
        if config is not None and "model_type" not in config:
            raise UserError("policy.config: missing key `model_type` (e.g. qwen3_moe, olmoe, mixtral, qwen2)")
        self.name_or_path = name_or_path
        self.config = dict(config) if config is not None else None
        self.tokenizer_name = tokenizer
        self.moe_backend = moe_backend
        self.moe_recompute_activation = moe_recompute_activation
        self.megablocks_kernels = megablocks_kernels
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.gradient_checkpointing = gradient_checkpointing
        if not (cudnn_attention == "auto" or isinstance(cudnn_attention, bool)):
            raise UserError(f"{KEY}.cudnn_attention: expected auto, true or false, got {cudnn_attention!r}")
        self.cudnn_attention = cudnn_attention

    def build_tokenizer(self):
        name = self.tokenizer_name or self.name_or_path
        if name is None:
            raise UserError(f"{KEY}.tokenizer: required when the model comes from `config`")
        if name == CHAR_TOKENIZER:
            return build_char_tokenizer()
        key = f"{KEY}.tokenizer" if self.tokenizer_name else f"{KEY}.name_or_path"
        self._check_exists(name, key)
        try:
            tok = load_tokenizer(name, revision=self.revision, trust_remote_code=self.trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(f"{key}: cannot load {name!r}: {str(err).splitlines()[0]}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def build(self, tokenizer=None) -> tuple[PreTrainedModel, Any]:
        """The model and its tokenizer (`tokenizer`: one already built by `build_tokenizer`)."""
        tokenizer = tokenizer if tokenizer is not None else self.build_tokenizer()
        dtype = getattr(torch, self.dtype)
        if self.config is not None:
            config = self.model_config(tokenizer)
            if self.attn_implementation:
                config._attn_implementation = self.attn_implementation
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            self._check_exists(self.name_or_path, f"{KEY}.name_or_path")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    self.name_or_path,
                    dtype=dtype,
                    revision=self.revision,
                    trust_remote_code=self.trust_remote_code,
                    attn_implementation=self.attn_implementation,
                )
            except OSError as err:
                raise FileNotFoundError(
                    f"{KEY}.name_or_path: cannot load {self.name_or_path!r}: {str(err).splitlines()[0]}"
                ) from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"policy: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                f"{model.get_input_embeddings().num_embeddings}"
            )
        backend = apply_moe_backend(model, self.moe_backend, recompute_activation=self.moe_recompute_activation,
                                    kernels=self.megablocks_kernels)
        log.info("policy: %s, %.2fM parameters, moe_backend=%s", type(model).__name__, count_parameters(model) / 1e6, backend)
        self.moe_backend_in_effect = backend
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model, tokenizer

    def model_config(self, tokenizer):
        """The transformers config of the model this policy builds (no weights are loaded)."""
        if self.config is None:
            self._check_exists(self.name_or_path, f"{KEY}.name_or_path")
            return AutoConfig.from_pretrained(self.name_or_path, revision=self.revision, trust_remote_code=self.trust_remote_code)
        cfg = dict(self.config)
        model_type = cfg.pop("model_type")
        cfg.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                cfg.setdefault(key, getattr(tokenizer, key))
        return AutoConfig.for_model(model_type, **cfg)

    @staticmethod
    def _check_exists(name: str, key: str) -> None:
        if _looks_local(name) and not Path(name).expanduser().exists():
            raise FileNotFoundError(f"{key}: path does not exist: {name}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_pretrained(model: PreTrainedModel, tokenizer, directory: str | Path) -> Path:
    """Write model + tokenizer + generation config atomically: a sibling temp dir, then rename."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # What the project loads must be what plain transformers loads; say so once when it is not.
    problem = check_autotokenizer(tokenizer if hasattr(tokenizer, "encode") else load_tokenizer(tmp), tmp)
    if problem:
        log.warning("export %s: %s", directory, problem)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
