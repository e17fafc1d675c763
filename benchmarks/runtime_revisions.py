"""End-to-end batch-1 latency of the fused packed runtime at two revisions of bnnslim, on this CPU.

Each revision is checked out into a temporary git worktree and timed in its
own process (a process imports one bnnslim), alternating base and head for
``--pairs`` pairs: the slim examples of ``runtime_vs_peers.py`` (width 0.5,
xnor scheme, random batch-norm statistics), one thread, ``--rounds`` rounds
of ``--inner`` calls each. A round's time is the mean of its calls; the
figure per process is the best round (on a shared machine the
least-disturbed round is the one that measures the code), and the record
gives each pair's figures and the ratio of the best of each side.

    python benchmarks/runtime_revisions.py --base fed0ae9   # writes runtime_revisions.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import git_revision, header, write_record  # noqa: E402

#: run in a fresh process with the revision's checkout first on sys.path: prints {network: best round, us}
WORKER = """
import json, sys, time, warnings
root, networks, rounds, inner = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [root, {here!r}]
warnings.simplefilter("ignore")
import torch
import bnnslim
assert bnnslim.__file__.startswith(root), bnnslim.__file__
from runtime_vs_peers import build_models
from bnnslim.runtime import set_threads, to_runtime
set_threads(1)
out = {{}}
for name in networks:
    _, binary, x = build_models(name)
    model = to_runtime(binary)
    with torch.no_grad():
        for _ in range(30):
            model(x)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(inner):
                model(x)
            best = min(best, (time.perf_counter() - start) / inner)
    out[name] = best * 1e6
print(json.dumps(out))
"""


def time_revision(root: Path, networks: list[str], rounds: int, inner: int) -> dict[str, float]:
    """{network: best round in us} for the checkout at ``root``, in a process of its own."""
    code = WORKER.format(here=str(HERE))
    done = subprocess.run([sys.executable, "-c", code, str(root), ",".join(networks), str(rounds), str(inner)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: timing the checkout of {root.name} failed ({last}): that revision may predate the "
                 "examples or runtime_vs_peers.py; pick a later --base")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit or branch)")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--networks", nargs="*", default=["nin", "vgg11", "resnet18"])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "runtime_revisions.md")
    args = parser.parse_args(argv)
    repo = HERE.parent
    revs: dict[str, str] = {}
    for side, rev in (("base", args.base), ("head", args.head)):
        found = subprocess.run(["git", "rev-parse", "--short", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                               capture_output=True, text=True)
        if found.returncode != 0:
            sys.exit(f"error: --{side} {rev} is not a commit of this repository: give a commit hash or branch name")
        revs[side] = found.stdout.strip()
    results: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {side: Path(tmp) / side for side in revs}
        try:
            for side, rev in revs.items():
                subprocess.run(["git", "worktree", "add", "-q", "--detach", str(roots[side]), rev], cwd=repo,
                               check=True)
            for pair in range(args.pairs):
                for side in ("base", "head"):
                    results[side].append(time_revision(roots[side], args.networks, args.rounds, args.inner))
                    print(f"pair {pair + 1}: {side} done", file=sys.stderr)
        finally:
            for root in roots.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=repo, check=False)
    lines = [header("Fused packed runtime at two revisions (batch 1, one thread)"),
             f"- base: {revs['base']}, head: {revs['head']} (the script's own revision: {git_revision()})",
             f"- each revision in a git worktree and a process of its own, alternating base and head for "
             f"{args.pairs} pairs; {args.rounds} rounds x {args.inner} calls per network, the best round",
             "- models: the slim examples of runtime_vs_peers.py (width 0.5, xnor, random batch-norm statistics)",
             "", "| network | base (us), per pair | head (us), per pair | speed-up (best base / best head) |",
             "|---|---|---|---|"]
    for name in args.networks:
        base = [r[name] for r in results["base"]]
        head = [r[name] for r in results["head"]]
        lines.append(f"| {name} | {' / '.join(f'{t:.1f}' for t in base)} | {' / '.join(f'{t:.1f}' for t in head)} "
                     f"| {min(base) / min(head):.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_record(args.out, text)


if __name__ == "__main__":
    main()
