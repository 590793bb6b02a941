"""Score the 164 HumanEval canonical solutions (and empty bodies) through the ``code`` reward.

    python scripts/bench_humaneval.py [--workers N] [--timeout S] [--partial-credit]

Prints the sandbox isolation in use, the wall time per pass and the scores; exits non-zero if a
canonical solution fails or an empty body passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from r1lightning.rewards.code import CodeReward
from r1lightning.sandbox import sandbox_capabilities
from r1lightning.tasks.humaneval import load_humaneval


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--partial-credit", action="store_true")
    args = ap.parse_args(argv)

    problems = load_humaneval()
    caps = sandbox_capabilities()
    reward = CodeReward(timeout=args.timeout, max_workers=args.workers, include_prompt=True,
                        partial_credit=args.partial_credit)  # fmt: skip
    print(f"{len(problems)} problems, isolation={caps['isolation']}, cgroup={caps['cgroup'] or 'none (rlimits)'}, "
          f"workers={reward.max_workers}, cpus={os.cpu_count()}, load={os.getloadavg()[0]:.2f}")
    prompts = [p["prompt"] for p in problems]
    kw = dict(test=[p["test"] for p in problems], entry_point=[p["entry_point"] for p in problems])
    failed = 0
    for name, completions, want in [
        ("canonical", [p["canonical_solution"] for p in problems], 1.0),
        ("empty body", ["    pass\n"] * len(problems), 0.0),
    ]:
        t0 = time.perf_counter()
        scores = reward(prompts, completions, **kw)
        wall = time.perf_counter() - t0
        off = [p["task_id"] for p, s in zip(problems, scores) if (s == 1.0) != (want == 1.0)]
        print(f"{name:>10}: mean score {sum(scores) / len(scores):.4f}  wall {wall:.2f}s "
              f"({1000 * wall / len(scores):.0f} ms/problem)  unexpected: {off or 'none'}")  # fmt: skip
        failed += len(off)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
