"""Float vs binary small CNN on full Fashion-MNIST, with and without a float teacher (issue 11, item 4).

Ways to train ``examples/small_cnn.py`` for the same number of epochs, each
over several seeds:

- ``float``: the float model itself (recorded by the ``distilled`` run: its
  float phase is exactly this model trained from scratch);
- ``binary``: ``bnnslim binarize`` from scratch (first conv and classifier
  real);
- ``distilled``: ``bnnslim binarize --teacher-epochs E``: the float model
  trained first, the binary network started from its weights and trained with
  ``CE + T^2 KL`` against it (Real-to-Binary, Martinez et al. 2020);
- ``refit``: ``bnnslim binarize --teacher T --weights T`` with T the float
  model the ``distilled`` run of the same seed trained (kept under
  ``--keep-runs``): the same as ``distilled`` without training the float model
  again, e.g. to try another ``--scheme``;
- ``twostep``: ``refit`` trained in two steps (``--real-weight-epochs E``):
  E epochs with binary activations and real weights first, then the E epochs
  with both binary (ReActNet, Liu et al. 2020).

Every finished run is appended to ``--results`` (JSON lines), so the cells can
be split across processes and an interrupted run continues; the report is
rewritten from all recorded runs. Needs Debian's ``dataset-fashion-mnist``.

    python benchmarks/binarize_fashion_mnist.py --variants distilled binary --keep-runs /tmp/runs
    python benchmarks/binarize_fashion_mnist.py --variants refit --scheme bireal --keep-runs /tmp/runs
    python benchmarks/binarize_fashion_mnist.py --variants twostep --scheme bireal --keep-runs /tmp/runs
    python benchmarks/binarize_fashion_mnist.py --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.train import TrainConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

MODEL = str(HERE.parent / "examples" / "small_cnn.py")
VARIANTS = ("binary", "distilled", "refit", "twostep")
DEFAULT_LR = 2e-3


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one cell; returns its record (accuracies per epoch, seconds)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep_runs or Path(scratch)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, seed=seed,
                          distill=args.distill, temperature=args.temperature)
        twin = None
        if variant in ("refit", "twostep"):
            twin = work / f"distilled-seed{seed}" / "teacher.safetensors"
            if not twin.is_file():
                raise SystemExit(f"refit needs the float model of a distilled run: {twin} not found "
                                 "(run --variants distilled with the same --keep-runs first)")
        started = time.perf_counter()
        name = f"{variant}-seed{seed}" if args.scheme == "xnor" else f"{variant}-{args.scheme}-seed{seed}"
        result = binarize(BinarizeOptions(model=MODEL, run=work / name,
                                          overwrite=True, data="fashion-mnist", data_root=args.data_root, train=cfg,
                                          scheme=args.scheme, teacher=twin, weights=twin,
                                          teacher_epochs=args.epochs if variant == "distilled" else 0,
                                          real_weight_epochs=args.epochs if variant == "twostep" else 0))
        seconds = time.perf_counter() - started
        manifest = result.run.read_manifest()
    record = {"variant": variant, "scheme": args.scheme, "seed": seed, "epochs": args.epochs, "lr": args.lr,
              "accuracy": result.test_accuracy, "history": [h.test_accuracy for h in result.history],
              "seconds": seconds, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if variant != "binary":
        record.update(distill=args.distill, temperature=args.temperature)
    if variant == "distilled":
        record["float_accuracy"] = manifest["binarize"].get("teacher_test_accuracy")
    return record


def load_records(path: Path) -> list[dict]:
    """The recorded runs, one per cell (a cell run twice, e.g. by two processes, counts once: the first)."""
    seen: dict[tuple, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            r = json.loads(line)
            seen.setdefault((r["variant"], r.get("scheme", "xnor"), r["lr"], r["seed"], r["epochs"]), r)
    return list(seen.values())


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


NAMES = {"binary": "binary (`bnnslim binarize --scheme {scheme}`)",
         "distilled": "binary distilled from the float model (`--scheme {scheme} --teacher-epochs E`)",
         "refit": "binary distilled from the float model (`--scheme {scheme} --teacher T --weights T`)",
         "twostep": "the same, in two steps (`... --real-weight-epochs E`: E epochs with real weights first)"}


def report(records: list[dict]) -> str:
    def per_seed(values: list[tuple[int, float]]) -> str:
        return " / ".join(f"{100 * v:.2f}" for _, v in sorted(values))

    floats = [(r["seed"], r["float_accuracy"]) for r in records if r["variant"] == "distilled"]
    float_mean = statistics.mean(v for _, v in floats) if floats else None
    epochs = sorted({r["epochs"] for r in records})
    lines = [header("Binarize: float vs binary small CNN on full Fashion-MNIST"),
             f"\n60,000 train / 10,000 test images, batch 128, Adam with cosine schedule (lr {DEFAULT_LR:g} unless "
             f"a row says otherwise), {', '.join(map(str, epochs))} epochs, first conv and the linear classifier "
             "real; distillation: CE + w T^2 KL with the defaults of `bnnslim binarize` (w = 1, T = 4). One process "
             "per run, `OMP_NUM_THREADS=1`, up to three runs sharing the 2 cores.\n",
             "| network | seeds | test accuracy per seed (%) | mean ± std | behind float (pt) | minutes per run |",
             "|---|---|---|---|---|---|",
             f"| float (the same model, trained from scratch) | {len(floats)} | {per_seed(floats)} | "
             f"{mean_std([v for _, v in floats])} |  | in the distilled run |"]
    cells = {(r["variant"], r.get("scheme", "xnor"), r["lr"]) for r in records}
    for variant, scheme, lr in sorted(cells, key=lambda c: (VARIANTS.index(c[0]), c[1] != "xnor", c[1], c[2])):
        cell = [r for r in records
                if r["variant"] == variant and r.get("scheme", "xnor") == scheme and r["lr"] == lr]
        values = [(r["seed"], r["accuracy"]) for r in cell]
        gap = "" if float_mean is None else f"{100 * (float_mean - statistics.mean(v for _, v in values)):.2f}"
        minutes = statistics.mean(r["seconds"] / 60 for r in cell)
        name = NAMES[variant].format(scheme=scheme) + ("" if lr == DEFAULT_LR else f", `--lr {lr:g}`")
        lines.append(f"| {name} | {len(values)} | {per_seed(values)} | "
                     f"{mean_std([v for _, v in values])} | {gap} | {minutes:.0f} |")
    lines.append("\nThe distilled run's minutes include its float phase (E float epochs, then E binary epochs); the "
                 "two-step run's its E epochs with real weights (but not the float phase, trained by the distilled "
                 "run).\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--distill", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--scheme", default="xnor")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=HERE / "binarize_fashion_mnist.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "binarize_fashion_mnist.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep each run directory under this folder")
    args = parser.parse_args()
    records = load_records(args.results)
    if not args.report_only:
        done = {(r["variant"], r.get("scheme", "xnor"), r["lr"], r["seed"], r["epochs"]) for r in records}
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, args.scheme, args.lr, seed, args.epochs) in done:
                    continue
                record = run_one(variant, seed, args)
                print(json.dumps(record), flush=True)
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
    records = [r for r in records if r["epochs"] == args.epochs]
    text = report(records)
    write_record(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
