"""Start-up to the first answer: `ra chat SOURCE --ask Hello -n 1`, whole processes timed.

    python benchmarks/startup.py SOURCE [--model NAME] [--compare OTHER_CHECKOUT] [--runs 5]

SOURCE: a saved context, or a document whose context is in ra's cache (for the model asked for).

Each run is a fresh process (imports, model load from the cache, context open, one prompt and one
token). With --compare the same command runs from another checkout's code (a `git worktree` of
an older commit) alternately with this one, so both see the same machine load. One JSON line per
run, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run_once(context: str, tree: Path, model: str | None) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    began = time.perf_counter()
    # run from the checkout: `python -m` puts the working directory first on the import path
    subprocess.run([sys.executable, "-m", "ra_cli", "chat", context, "--ask", "Hello", "-n", "1",
                    *(["--model", model] if model else [])], env=env, cwd=tree,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("context")
    parser.add_argument("--model")
    parser.add_argument("--compare", type=Path, help="another checkout of ra to time alternately")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    args.context = str(Path(args.context).resolve())
    trees = {"this": HERE} | ({str(args.compare): args.compare.resolve()} if args.compare else {})
    for tree in trees.values():
        run_once(args.context, tree, args.model)  # warm the page cache and any first-run packing
    walls: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            walls[name].append(run_once(args.context, tree, args.model))
            print(json.dumps({"code": name, "wall_s": round(walls[name][-1], 3)}), flush=True)
    print(json.dumps({name: {"median_wall_s": round(statistics.median(w), 3), "runs": len(w)}
                      for name, w in walls.items()}))


if __name__ == "__main__":
    main()
