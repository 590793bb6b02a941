"""`r1lightning export`: a `save_pretrained` directory (model, tokenizer, generation config) from any
Lightning checkpoint of a `PolicyModule`, one file or an FSDP sharded checkpoint directory.

    r1lightning export --ckpt runs/quickstart/grpo/checkpoints/last.ckpt --out runs/quickstart/grpo/model-last
    r1lightning export --ckpt <sharded.ckpt dir> --config <the run's config.yaml> --out <dir> --dtype bfloat16

Every checkpoint written by this project carries what export needs under the key `r1lightning`
(model config, generation config, tokenizer files); `--config` is for checkpoints without it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from pathlib import Path

# torch, transformers and the policy are imported inside the functions: `r1lightning export --help`
# and argument errors answer at once.

log = logging.getLogger(__name__)

META_KEY = "r1lightning"
POLICY_PREFIX = "model."  # PolicyModule.model; the GRPO reference lives under "ref_model."
DCP_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


# -- what a checkpoint carries -------------------------------------------------------------------
def checkpoint_metadata(module) -> dict:
    """Model config, generation config and tokenizer files of a PolicyModule (cached: they do not
    change during a run)."""
    meta = getattr(module, "_r1l_export_meta", None)
    if meta is None:
        with tempfile.TemporaryDirectory() as tmp:
            module.tokenizer.save_pretrained(tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        meta = {
            "model_config": module.model.config.to_dict(),
            "generation_config": module.model.generation_config.to_dict(),
            "tokenizer_files": files,
        }
        module._r1l_export_meta = meta
    return meta


# -- from weights to a directory -----------------------------------------------------------------
def model_from_state(config, state: dict[str, torch.Tensor], generation_config=None):
    """A transformers model holding `state`'s tensors, built without initialising weights."""
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = next(iter(dtypes))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head is one tensor again, not a second copy
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise ValueError(f"export: checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    # Non-persistent buffers (rotary frequencies) are rebuilt by transformers on load, not saved.
    if generation_config is not None:
        model.generation_config = generation_config
    return model.eval()


def export_model(model, tokenizer, directory, is_global_zero: bool = True) -> Path | None:
    """Write model + tokenizer + generation config atomically. Under FSDP every rank must call this
    (gathering the shards is a collective); rank 0 writes."""
    from r1lightning.policy import export_pretrained
    from r1lightning.strategies import full_state_dict

    state = full_state_dict(model)
    if not is_global_zero:
        return None
    if state is None:
        return export_pretrained(model, tokenizer, directory)
    plain = model_from_state(model.config, state, model.generation_config)
    return export_pretrained(plain, tokenizer, directory)


# -- reading checkpoints -------------------------------------------------------------------------
def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # older checkpoints may pickle objects; they are the user's own files
        log.warning("export: %s needs full unpickling (%s); loading it as trusted", path, str(err).splitlines()[0])
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def load_policy_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(policy state dict with transformers' keys, the checkpoint's other entries)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"export --ckpt: no such file or directory: {path}")
    if path.is_dir():
        return _load_sharded(path)
    ckpt = _torch_load(path)
    if "state_dict" not in ckpt:
        raise ValueError(f"export --ckpt: {path} is not a Lightning checkpoint (no `state_dict`)")
    state = {k[len(POLICY_PREFIX):]: v for k, v in ckpt.pop("state_dict").items() if k.startswith(POLICY_PREFIX)}
    ckpt.pop("optimizer_states", None)
    return state, ckpt


def _load_sharded(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Consolidate an FSDP distributed checkpoint (torch.distributed.checkpoint format) in this one
    process, reading only the policy's tensors (not the optimizer state or the reference)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta_file = path / DCP_METADATA
    if not meta_file.exists():
        raise ValueError(f"export --ckpt: {path} is a directory but not a sharded Lightning checkpoint (no {DCP_METADATA})")
    reader = dcp.FileSystemReader(str(path))
    prefix = "state_dict." + POLICY_PREFIX
    state = {
        key[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"export --ckpt: {path} holds no `{POLICY_PREFIX}*` tensors")
    nested = {"state_dict": {POLICY_PREFIX + k: v for k, v in state.items()}}
    dcp.load(nested, storage_reader=reader, no_dist=True)
    return {k[len(POLICY_PREFIX):]: v for k, v in nested["state_dict"].items()}, _torch_load(meta_file)


# -- model config and tokenizer ------------------------------------------------------------------
def _from_metadata(meta: dict):
    from transformers import AutoConfig, GenerationConfig

    cfg = dict(meta["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    generation = GenerationConfig.from_dict(meta["generation_config"]) if meta.get("generation_config") else None
    return config, generation, meta["tokenizer_files"]


def _from_config_file(config_path: Path):
    """The policy as the run's YAML describes it (config dict or pretrained directory/hub id)."""
    import yaml
    from transformers import GenerationConfig

    cfg = yaml.safe_load(config_path.read_text()) or {}
    try:
        spec = cfg["model"]["init_args"]["policy"]
    except (KeyError, TypeError):
        raise ValueError(f"export --config: {config_path} has no model.init_args.policy") from None
    module_name, _, cls_name = spec.get("class_path", "r1lightning.Policy").rpartition(".")
    policy = getattr(importlib.import_module(module_name), cls_name)(**(spec.get("init_args") or {}))
    tokenizer = policy.build_tokenizer()
    config = policy.model_config(tokenizer)
    generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return config, generation, tokenizer


def export_checkpoint(ckpt: str | Path, out: str | Path, config: str | Path | None = None, dtype: str = "auto") -> Path:
    import torch

    from r1lightning.policy import export_pretrained

    state, rest = load_policy_state(ckpt)
    meta = rest.get(META_KEY)
    if meta is not None:
        model_config, generation, tokenizer_files = _from_metadata(meta)
        tokenizer = None
    elif config is not None:
        model_config, generation, tokenizer = _from_config_file(Path(config))
        tokenizer_files = None
    else:
        raise ValueError(f"export: {ckpt} carries no model description (`{META_KEY}`); pass the run's --config <config.yaml>")
    if dtype != "auto":
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    model = model_from_state(model_config, state, generation)
    if tokenizer is None:
        tokenizer = _SavedFiles(tokenizer_files)
    return export_pretrained(model, tokenizer, out)


class _SavedFiles:
    """Stands in for a tokenizer in `export_pretrained`: writes the files it was saved as."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def save_pretrained(self, directory) -> None:
        for name, data in self.files.items():
            (Path(directory) / name).write_bytes(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="r1lightning export",
        description="Write a save_pretrained directory (model, tokenizer, generation config) from a Lightning checkpoint.",
    )
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, or the directory of an FSDP sharded checkpoint")
    parser.add_argument("--out", required=True, help="the directory to write (replaced atomically)")
    parser.add_argument("--config", help="the run's config.yaml, for checkpoints that carry no model description")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype of the export (auto: as trained)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = export_checkpoint(args.ckpt, args.out, args.config, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"r1lightning export: error: {err}\n")
    print(f"exported {args.ckpt} -> {Path(path).resolve()}")


if __name__ == "__main__":
    main()
