"""Reward functions: registry, YAML-friendly ``Reward`` wrapper and ``RewardComposer``.

Reward functions use TRL's GRPOTrainer convention so existing ones work unchanged::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` holds the dataset's extra columns (lists aligned with ``completions``)
plus ``completion_ids``. ``None`` means "does not apply to this sample".
Functions must accept and ignore unknown keyword arguments.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)
# Not `import math`: the submodule r1lightning.rewards.math would shadow it here.
_NAN = float("nan")

__all__ = [
    "register_reward",
    "get_reward",
    "registered_rewards",
    "Reward",
    "RewardComposer",
    "RewardOutput",
]

_REGISTRY: dict[str, Any] = {}
# Imported on first request so an optional/heavy module only fails when asked for.
_LAZY: dict[str, str] = {"code": "r1lightning.rewards.code:CodeReward", "reward_model": "r1lightning.rewards.reward_model:RewardModelReward"}


def register_reward(name: str) -> Callable[[Any], Any]:
    """Decorator registering a reward function or class under ``name``."""

    def decorator(obj: Any) -> Any:
        prev = _REGISTRY.get(name)
        # Re-importing the same module (reloads, the lazy ``code`` entry) must not fail.
        if prev is not None and prev is not obj and _qualname(prev) != _qualname(obj):
            raise ValueError(f"reward name {name!r} already registered to {_qualname(prev)}")
        _REGISTRY[name] = obj
        _LAZY.pop(name, None)
        return obj

    return decorator


def registered_rewards() -> list[str]:
    """Names accepted by :func:`get_reward` besides import paths."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _import_path(path: str) -> Any:
    """Resolve ``pkg.mod:attr`` or ``pkg.mod.attr`` (attr may be dotted)."""
    if ":" in path:
        candidates = [tuple(path.split(":", 1))]
    else:
        parts = path.split(".")
        # Longest importable module prefix wins; the rest is an attribute chain.
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    last_err: Exception | None = None
    for mod_name, attr in candidates:
        if not mod_name or not attr:
            continue
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" means try a shorter one; a missing
            # dependency inside an existing module is a real error.
            if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                last_err = e
                continue
            raise ValueError(f"cannot import reward {path!r}: {type(e).__name__}: {e}") from e
        except Exception as e:
            raise ValueError(f"cannot import reward {path!r}: {type(e).__name__}: {e}") from e
        obj: Any = module
        try:
            for a in attr.split("."):
                obj = getattr(obj, a)
        except AttributeError as e:
            raise ValueError(f"cannot import reward {path!r}: module {mod_name!r} has no attribute {attr!r}") from e
        return obj
    raise ValueError(f"cannot import reward {path!r}: {last_err}")


def _is_model(name: str) -> bool:
    from r1lightning.rewards.reward_model import looks_like_model

    return looks_like_model(name)


def get_reward(name_or_path: str, **kwargs: Any) -> Callable[..., list]:
    """Return a callable reward from a registered name or an import path.

    Classes are instantiated with ``kwargs``; plain functions get ``kwargs``
    bound with :func:`functools.partial`. A directory or hub id (``org/name``)
    is a reward model (:class:`~r1lightning.rewards.reward_model.RewardModelReward`).
    """
    if name_or_path in _REGISTRY:
        obj = _REGISTRY[name_or_path]
    elif name_or_path in _LAZY:
        obj = _import_path(_LAZY[name_or_path])
        _REGISTRY.setdefault(name_or_path, obj)
        _LAZY.pop(name_or_path, None)
    elif _is_model(name_or_path):  # TRL's form: a reward-model id or directory where a function goes
        from r1lightning.rewards.reward_model import RewardModelReward

        return RewardModelReward(name_or_path, **kwargs)
    elif "." in name_or_path or ":" in name_or_path:
        obj = _import_path(name_or_path)
    else:
        raise ValueError(
            f"unknown reward {name_or_path!r}; registered: {', '.join(registered_rewards())} "
            "(or give an import path such as 'my_pkg.my_mod.my_reward')"
        )
    if inspect.isclass(obj):
        obj = obj(**kwargs)
    elif kwargs:
        obj = functools.partial(obj, **kwargs)
    if not callable(obj):
        raise ValueError(f"reward {name_or_path!r} resolved to a non-callable {type(obj).__name__}")
    return obj


class Reward:
    """One weighted reward function, constructible from YAML.

    Args:
        fn: registered name (``accuracy``, ``format``, ...) or import path
            (``my_pkg.rewards.my_fn`` / ``my_pkg.rewards:MyReward``).
        weight: multiplier in the composed total; 0 keeps it as a logged metric only.
        name: key in logs; defaults to the last component of ``fn``.
        kwargs: constructor arguments (classes) or bound keyword arguments (functions).
        kinds: apply only to rows whose ``kind_column`` is one of these (None elsewhere); see
            :mod:`r1lightning.rewards.routing`. None: every row.
        kind_column: the column that names a row's kind.
    """

    def __init__(
        self,
        fn: str,
        weight: float = 1.0,
        name: str | None = None,
        kwargs: dict | None = None,
        kinds: list[str | None] | None = None,
        kind_column: str = "kind",
    ) -> None:
        self.fn = fn
        self.weight = float(weight)
        if name is None:  # a model id or directory: its last component; an import path: its attribute
            name = fn.rstrip("/").rsplit("/", 1)[-1] if "/" in fn else fn.replace(":", ".").rsplit(".", 1)[-1]
        self.name = name
        self.kwargs = dict(kwargs or {})
        self.kinds = None if kinds is None else list(kinds)
        self.kind_column = kind_column
        # Resolve now so a typo fails at config time, not after the first rollout.
        self._callable = get_reward(fn, **self.kwargs)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list:
        if self.kinds is not None:
            from r1lightning.rewards.routing import route

            return route(self._callable, self.kinds, self.kind_column, self.name, prompts, completions, **columns)
        return self._callable(prompts=prompts, completions=completions, **columns)

    def __repr__(self) -> str:
        kinds = f", kinds={self.kinds!r}" if self.kinds is not None else ""
        return f"Reward(fn={self.fn!r}, weight={self.weight}, name={self.name!r}, kwargs={self.kwargs!r}{kinds})"


@dataclass
class RewardOutput:
    total: torch.Tensor  # [N] float32, weighted nansum over functions
    per_fn: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N], NaN where None
    errors: dict[str, int] = field(default_factory=dict)  # name -> samples whose reward raised


_RESERVED = ("prompts", "completions", "completion_ids")


class RewardComposer:
    """Calls each reward on a batch and combines them into one weighted reward per sample.

    A reward that raises on the batch is retried sample by sample; samples that
    still raise get ``None`` and are counted in ``errors`` (a warning is logged),
    so one bad sample never crashes a run.
    """

    def __init__(self, rewards: Sequence[Reward]) -> None:
        self.rewards = list(rewards)
        names = [r.name for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate reward names {dup}; give each Reward a distinct name=")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list] | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> RewardOutput:
        n = len(completions)
        columns = dict(columns or {})
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions; repeat each prompt per completion")
        for k, v in columns.items():
            if k in _RESERVED:
                raise ValueError(f"dataset column {k!r} clashes with a reserved reward argument")
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} entries for {n} completions")
        if completion_ids is not None:
            if len(completion_ids) != n:
                raise ValueError(f"completion_ids has {len(completion_ids)} entries for {n} completions")
            columns["completion_ids"] = completion_ids

        total = torch.zeros(n, dtype=torch.float32)
        per_fn: dict[str, torch.Tensor] = {}
        errors: dict[str, int] = {}
        for reward in self.rewards:
            values, n_err, first_err = self._score(reward, prompts, completions, columns, n)
            per_fn[reward.name] = values
            errors[reward.name] = n_err
            if n_err:
                logger.warning(
                    "reward %r raised on %d/%d samples (scored as None); first error: %s",
                    reward.name, n_err, n, first_err,
                )
            total += torch.nan_to_num(values * reward.weight, nan=0.0)
        return RewardOutput(total=total, per_fn=per_fn, errors=errors)

    @staticmethod
    def _to_tensor(reward: Reward, out: Any, expected: int) -> torch.Tensor:
        try:
            out = list(out)
        except TypeError:
            raise ValueError(f"reward {reward.name!r} returned {type(out).__name__}, expected a list") from None
        if len(out) != expected:
            raise ValueError(f"reward {reward.name!r} returned {len(out)} values for {expected} completions")
        vals = []
        for v in out:
            if v is None:
                vals.append(_NAN)
                continue
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                raise ValueError(f"reward {reward.name!r} returned non-numeric value {v!r}") from None
        return torch.tensor(vals, dtype=torch.float32)

    def _score(self, reward: Reward, prompts, completions, columns, n):
        try:
            out = reward(prompts, completions, **columns)
        except Exception:
            pass  # isolate the offending samples below
        else:
            return self._to_tensor(reward, out, n), 0, None
        values = torch.full((n,), _NAN, dtype=torch.float32)
        n_err, first_err = 0, None
        for i in range(n):
            cols_i = {k: v[i : i + 1] for k, v in columns.items()}
            try:
                out = reward(prompts[i : i + 1], completions[i : i + 1], **cols_i)
            except Exception as e:
                n_err += 1
                if first_err is None:
                    first_err = f"{type(e).__name__}: {e}"
                continue
            values[i] = self._to_tensor(reward, out, 1)[0]
        return values, n_err, first_err


# Registers the builtin rewards; must come after register_reward is defined.
from r1lightning.rewards import math as _builtin_math  # noqa: E402,F401
