"""Reward functions: registry, YAML-friendly ``Reward`` wrapper and ``RewardComposer``.

Reward functions named by import path are called exactly as TRL's ``GRPOTrainer`` calls them,
so functions written for TRL or open-r1 work unchanged::

    fn(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=..., log_metric=...)
        -> list[float | None]

* plain rows (a string ``prompt``): ``prompts`` are the dataset's prompt strings, ``completions``
  the generated texts;
* conversational rows (``prompt`` a list of messages, or ``messages``): ``prompts`` are the message
  lists the policy was prompted with and each completion is ``[{"role": "assistant", "content": text}]``
  (open-r1 reads ``completion[0]["content"]``);
* ``columns``: every dataset column but ``prompt`` / ``completion`` (lists aligned with ``completions``),
  ``completion_ids`` the sampled token ids, ``trainer_state`` the step (``global_step``, ``max_steps``,
  ``epoch``), ``log_metric(name, value)`` a scalar for the logs, ``log_extra(column, values)`` a column
  for the completions log.
* ``async def`` functions are awaited, all of a step's together (as TRL does).

The builtin (registered) rewards take text: ``prompts`` the rendered prompt texts, ``completions``
strings, every column. ``None`` means "does not apply to this sample". Functions must accept and
ignore unknown keyword arguments.

A function that raises on every sample (or returns NaN / a non-number for every sample) for
``max_failed_steps`` steps in a row stops the run with an error naming it and the exception.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import math as _math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from r1lightning.errors import UserError

logger = logging.getLogger(__name__)
_NAN = float("nan")

__all__ = [
    "register_reward",
    "get_reward",
    "registered_rewards",
    "Reward",
    "RewardComposer",
    "RewardOutput",
    "TrainerState",
    "is_conversational",
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
        inputs: ``trl`` (TRL's calling convention, see the module docstring), ``text`` (the builtins':
            texts and every column) or ``auto``: ``text`` for registered names, ``trl`` for import paths.
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
        inputs: str = "auto",
        kinds: list[str | None] | None = None,
        kind_column: str = "kind",
    ) -> None:
        if inputs not in ("auto", "trl", "text"):
            raise ValueError(f"reward {fn!r}: inputs={inputs!r} is not one of auto, trl, text")
        if inputs == "auto":
            inputs = "text" if (fn in _REGISTRY or fn in _LAZY) else "trl"
        self.inputs = inputs
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
        return self.invoke(prompts=prompts, completions=completions, **columns)

    def invoke(self, prompts: list, completions: list, **columns: Any):
        """The function on these rows, routed by kind when `kinds` is set (None for other kinds)."""
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
    # [N] bool: every function returned None (or failed) for the sample; TRL leaves these rows out
    # of the group baseline and gives them advantage 0 (`total` is 0 there).
    unscorable: torch.Tensor | None = None
    metrics: dict[str, list[float]] = field(default_factory=dict)  # from log_metric(name, value)
    extra: dict[str, list] = field(default_factory=dict)  # from log_extra(column, values)


@dataclass
class TrainerState:
    """What TRL's ``trainer_state`` argument offers reward functions that shape by progress."""

    global_step: int = 0
    max_steps: int = -1
    epoch: float = 0.0


def is_conversational(prompts: Sequence[Any]) -> bool:
    """TRL's test: a prompt is a list of ``{role, content}`` messages."""
    first = prompts[0] if len(prompts) else None
    return isinstance(first, list) and all(isinstance(m, dict) and "role" in m for m in first)


_RESERVED = ("prompts", "completions", "completion_ids")
# Dataset columns TRL does not pass to reward functions (they arrive as prompts / completions).
_TRL_SKIPPED = ("prompt", "completion")
_TRAINER_ARGS = ("trainer_state", "log_extra", "log_metric")


class _AsyncLoop:
    """One event loop on a daemon thread for async reward functions (clients bound to a loop keep working
    across steps); started on first use."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, coro):
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="r1lightning-async-rewards", daemon=True).start()
                cls._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, cls._loop).result()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class RewardComposer:
    """Calls each reward on a batch and combines them into one weighted reward per sample.

    A reward that raises on the batch is retried sample by sample; samples that
    still raise (or whose value is NaN or not a number) get ``None`` and are counted
    in ``errors`` (a warning is logged), so one bad sample never crashes a run. A
    function that fails on every sample for ``max_failed_steps`` calls in a row is a
    `UserError` naming it and the first error: a run that cannot learn stops.
    """

    def __init__(self, rewards: Sequence[Reward], max_failed_steps: int = 2) -> None:
        self.rewards = list(rewards)
        if max_failed_steps < 1:
            raise ValueError(f"max_failed_steps must be >= 1, got {max_failed_steps}")
        self.max_failed_steps = max_failed_steps
        self._failed_steps: dict[str, int] = {}
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
        *,
        reward_prompts: list | None = None,
        trainer_state: TrainerState | None = None,
    ) -> RewardOutput:
        """``prompts``: rendered prompt texts (builtins); ``reward_prompts``: the dataset's prompts as TRL
        passes them (strings, or message lists for conversational rows), default ``prompts``.
        ``trainer_state``: given by a trainer, it also makes ``log_metric`` / ``log_extra`` available."""
        n = len(completions)
        columns = dict(columns or {})
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions; repeat each prompt per completion")
        if reward_prompts is not None and len(reward_prompts) != n:
            raise ValueError(f"{len(reward_prompts)} reward prompts for {n} completions")
        for k, v in columns.items():
            if k in _RESERVED:
                raise ValueError(f"dataset column {k!r} clashes with a reserved reward argument")
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} entries for {n} completions")
        if completion_ids is not None:
            if len(completion_ids) != n:
                raise ValueError(f"completion_ids has {len(completion_ids)} entries for {n} completions")
            columns["completion_ids"] = completion_ids

        out = RewardOutput(total=torch.zeros(n, dtype=torch.float32))
        trl_prompts = list(reward_prompts) if reward_prompts is not None else list(prompts)
        conversational = is_conversational(trl_prompts)
        trl_completions = [[{"role": "assistant", "content": c}] for c in completions] if conversational else list(completions)
        trl_columns = {k: v for k, v in columns.items() if k not in _TRL_SKIPPED}
        shared: dict[str, Any] = {}
        if trainer_state is not None:
            shared = {
                "trainer_state": trainer_state,
                "log_metric": lambda name, value: out.metrics.setdefault(str(name), []).append(float(value)),
                "log_extra": lambda column, values: out.extra.__setitem__(str(column), list(values)),
            }

        def inputs(reward: Reward) -> tuple[list, list, dict]:
            if reward.inputs == "trl":
                return trl_prompts, trl_completions, trl_columns
            return list(prompts), list(completions), columns

        # One call per function on the whole batch; async functions are awaited together.
        results: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for reward in self.rewards:
            p, c, cols = inputs(reward)
            try:
                res = reward.invoke(prompts=p, completions=c, **cols, **shared)
            except Exception as e:
                results[reward.name] = e
                continue
            (pending if inspect.isawaitable(res) else results)[reward.name] = res
        if pending:
            async def gather():
                return await asyncio.gather(*pending.values(), return_exceptions=True)

            results.update(zip(pending, _AsyncLoop.run(gather())))

        scored = torch.zeros(n, dtype=torch.bool)
        for reward in self.rewards:
            res = results[reward.name]
            if isinstance(res, Exception):
                values, n_err, first_err = self._per_sample(reward, *inputs(reward), shared, n)
            else:
                values, n_err, first_err = self._to_tensor(reward, res, n)
            out.per_fn[reward.name] = values
            out.errors[reward.name] = n_err
            self._check_failures(reward, n_err, n, first_err)
            scored |= ~torch.isnan(values)
            out.total += torch.nan_to_num(values * reward.weight, nan=0.0)
        out.unscorable = ~scored
        return out

    def _check_failures(self, reward: Reward, n_err: int, n: int, first_err: str | None) -> None:
        if n_err:
            logger.warning(
                "reward %r failed on %d/%d samples (scored as None); first error: %s", reward.name, n_err, n, first_err
            )
        if n and n_err == n:
            steps = self._failed_steps.get(reward.name, 0) + 1
            self._failed_steps[reward.name] = steps
            if steps >= self.max_failed_steps:
                raise UserError(
                    f"reward {reward.name!r} ({reward.fn}) failed on every sample for {steps} step(s) in a row: {first_err}"
                )
        else:
            self._failed_steps[reward.name] = 0

    @staticmethod
    def _to_tensor(reward: Reward, out: Any, expected: int) -> tuple[torch.Tensor, int, str | None]:
        """Values as float32 [expected] with NaN for None; NaN or non-numbers count as failures."""
        try:
            out = list(out)
        except TypeError:
            raise ValueError(f"reward {reward.name!r} returned {type(out).__name__}, expected a list") from None
        if len(out) != expected:
            raise ValueError(f"reward {reward.name!r} returned {len(out)} values for {expected} completions")
        vals, n_bad, first_bad = [], 0, None
        for v in out:
            if v is None:
                vals.append(_NAN)
                continue
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                f = float(v)
            except (TypeError, ValueError):
                f, why = _NAN, f"returned a non-number {v!r} ({type(v).__name__})"
            else:
                why = "returned NaN" if _math.isnan(f) else None
            if why is not None:
                n_bad += 1
                first_bad = first_bad or why
            vals.append(f)
        return torch.tensor(vals, dtype=torch.float32), n_bad, first_bad

    def _per_sample(self, reward: Reward, prompts, completions, columns, shared, n):
        values = torch.full((n,), _NAN, dtype=torch.float32)
        n_err, first_err = 0, None
        for i in range(n):
            cols_i = {k: v[i : i + 1] for k, v in columns.items()}
            try:
                res = reward.invoke(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **cols_i, **shared)
                if inspect.isawaitable(res):
                    res = _AsyncLoop.run(_awaited(res))
            except Exception as e:
                n_err += 1
                first_err = first_err or _one_line(e)
                continue
            v, bad, why = self._to_tensor(reward, res, 1)
            values[i] = v[0]
            if bad:
                n_err += 1
                first_err = first_err or why
        return values, n_err, first_err


async def _awaited(awaitable):
    return await awaitable


# Registers the builtin rewards; must come after register_reward is defined.
from r1lightning.rewards import reasoning as _builtin_reasoning  # noqa: E402,F401
