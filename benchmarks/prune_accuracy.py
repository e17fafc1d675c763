"""How much accuracy pruning costs, per strategy and budget, over seeds (issue 11).

For each model: train (or reuse) one binary main network on full Fashion-MNIST,
then run ``bnnslim prune`` on a copy of it for every (keep, strategy, seed)
cell, plus the keep-1.0 control: the same schedule and the same training
budget (retraining per group, final fine-tuning, distillation) with nothing
removed. Reports mean ± standard deviation over seeds, the drop against the
control, and the speed figures: one selector-learning step and one distilled
training step as ratios to one plain training step, and prune's own time per
group beyond its training steps.

Every finished run is appended to ``--results`` (JSON lines), so an interrupted
benchmark continues where it stopped and a subset can be added to later.

    # what prune_accuracy.md records (about 4 hours of one CPU core; see the notes there)
    python benchmarks/prune_accuracy.py --models small_cnn.py --strategies subsidiary l1 bn random greedy
    python benchmarks/prune_accuracy.py --models vgg11.py@0.25 --strategies subsidiary bn random
    python benchmarks/prune_accuracy.py --models vgg11.py@0.25 --strategies subsidiary bn --keeps 0.5 \\
        --budget ops --no-control
    # rewrite the report and the README's table from the recorded runs
    python benchmarks/prune_accuracy.py --models small_cnn.py --report-only --readme README.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from bnnslim.stages.binarize import BinarizeOptions, binarize
from bnnslim.stages.prune import PruneOptions, prune
from bnnslim.train import TrainConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import header, write_record  # noqa: E402

STRATEGIES = ["subsidiary", "l1", "alpha", "bn", "random", "greedy"]
CONTROL = "control"  # keep 1.0, same schedule: nothing removed


def model_file(work: Path, spec: str) -> tuple[Path, str]:
    """``small_cnn.py`` or ``nin.py@0.25`` -> a model file building that example at that width."""
    example, _, width = spec.partition("@")
    w = float(width or 1.0)
    path = work / f"{Path(example).stem}_w{w}.py"
    path.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('ex', "
                    f"{str(HERE.parent / 'examples' / example)!r})\n"
                    "ex = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(ex)\n\n"
                    "def build_model(num_classes=10, in_channels=1):\n"
                    f"    return ex.build_model(num_classes, in_channels, width={w})\n")
    return path, f"{Path(example).stem} (width {w})"


def step_times(run: Path, device: torch.device, batch: int, steps: int = 10) -> dict[str, float]:
    """Seconds per step at ``batch``: plain training, training with the distillation teacher, selector learning."""
    from bnnslim.prune.schedule import PruneSchedule, ScheduleConfig
    from bnnslim.prune.subsidiary import selector_mask
    from bnnslim.run_model import load_run_model
    from bnnslim.rundir import RunDir
    from bnnslim.train import Distillation, Teacher, training_loss

    loaded = load_run_model(RunDir(run))
    model = loaded.model.to(device)
    teacher = Teacher.copy_of(model)
    x = torch.randn(batch, *loaded.input_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def timed(step) -> float:  # type: ignore[no-untyped-def]
        for _ in range(2):
            step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def plain() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def distilled() -> None:
        opt.zero_grad()
        training_loss(model(x), y, teacher(x), Distillation()).backward()
        opt.step()

    out = {"plain": timed(plain), "distilled": timed(distilled)}
    schedule = PruneSchedule(model, loaded.example(), ScheduleConfig(keep=0.5), teacher=teacher, device=device)
    g = schedule.groups[0]
    s = torch.full((g.size,), 0.1, requires_grad=True, device=device)
    schedule.controller.set_source(g.id, lambda: selector_mask(s))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    sgd = torch.optim.SGD([s], lr=0.005, momentum=0.9)

    def select() -> None:
        sgd.zero_grad()
        training_loss(model(x), y, teacher(x), Distillation()).backward()
        sgd.step()

    out["select"] = timed(select)
    schedule.close()
    return out


def load_results(path: Path) -> list[dict]:
    """The recorded runs, one per cell (a cell run twice, e.g. by two processes, counts once: the first)."""
    if not path.is_file():
        return []
    seen: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            seen.setdefault(cell_key(r), r)
    return list(seen.values())


def cell_key(r: dict) -> tuple:
    return (r["model"], r["keep"], r["strategy"], r["seed"], r["schedule"])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


#: options that only change how filters are chosen and how many per group: a keep-1.0 control, which removes
#: nothing and so runs no selection, trains the same with or without them
SELECTION_ONLY = ("budget", "select_steps", "select_lr", "penalty", "max_shift")


def control_schedule(schedule: str) -> str:
    """The schedule whose keep-1.0 control stands for ``schedule``'s: the same without its selection-only
    options (a control under ``{"budget": "ops"}`` would repeat the defaults' bit for bit)."""
    options = {} if schedule == "defaults" else json.loads(schedule)
    kept = {k: v for k, v in options.items() if k not in SELECTION_ONLY}
    return json.dumps(kept, sort_keys=True) if kept else "defaults"


def table(results: list[dict], model: str, schedule: str, keeps: list[float], strategies: list[str]) -> list[str]:
    rows = [r for r in results if r["model"] == model and r["schedule"] == schedule]
    borrowed = not any(r["strategy"] == CONTROL for r in rows) and control_schedule(schedule) != schedule
    source = control_schedule(schedule) if borrowed else schedule
    control_rows = sorted((r for r in results if r["model"] == model and r["schedule"] == source
                           and r["strategy"] == CONTROL), key=lambda r: r["seed"])
    control = [100 * r["accuracy"] for r in control_rows]
    c_mean = mean_std(control)[0] if control else None
    lines = ["| keep | strategy | seeds | test accuracy per seed (%) | mean ± std | drop vs control (pt) | "
             "filters kept | binary ops kept | seconds per run |", "|---|---|---|---|---|---|---|---|---|"]
    if control:
        m, s = mean_std(control)
        secs = statistics.fmean(r["seconds"] for r in control_rows)
        name = f"control of {source} (selection options do not change it)" if borrowed else "control (nothing removed)"
        lines.append(f"| 1.0 | {name} | {len(control)} | {' / '.join(f'{a:.2f}' for a in control)} "
                     f"| {m:.2f} ± {s:.2f} | 0 | all | all | {secs:.0f} |")
    for keep in keeps:
        for strategy in strategies:
            cell = sorted((r for r in rows if r["keep"] == keep and r["strategy"] == strategy), key=lambda r: r["seed"])
            if not cell:
                continue
            accs = [100 * r["accuracy"] for r in cell]
            m, s = mean_std(accs)
            drop = f"{m - c_mean:+.2f}" if c_mean is not None else "?"
            ops = statistics.fmean(r["ops_fraction"] for r in cell)
            lines.append(f"| {keep} | {strategy} | {len(cell)} | {' / '.join(f'{a:.2f}' for a in accs)} | "
                         f"{m:.2f} ± {s:.2f} | {drop} | {cell[0]['kept_filters']}/{cell[0]['total_filters']} | "
                         f"{100 * ops:.1f} % | {statistics.fmean(r['seconds'] for r in cell):.0f} |")
    return lines


UPWARD = json.dumps({"retrain_scope": "upward"})  # the paper's rule: the default until 2026-12-03
#: the README's tables: the schedule whose runs each holds, between its markers
README_TABLES = {"defaults": ("<!-- prune-accuracy: start -->", "<!-- prune-accuracy: end -->"),
                 UPWARD: ("<!-- prune-accuracy-upward: start -->", "<!-- prune-accuracy-upward: end -->")}


def accuracies(results: list[dict], model: str, keep: float, strategy: str, schedule: str = "defaults") -> list[float]:
    """Test accuracies (%) of one cell of ``schedule`` (by default: bnnslim prune's defaults), by seed."""
    cell = [r for r in results if r["model"] == model and r["schedule"] == schedule and r["keep"] == keep
            and r["strategy"] == strategy]
    return [100 * r["accuracy"] for r in sorted(cell, key=lambda r: r["seed"])]


def verdict(results: list[dict], model: str, keep: float, strategies: list[str], schedule: str = "defaults") -> str:
    """Which strategy wins at ``keep``: ahead only by more than two seed standard deviations (issue 11's bar)."""
    stats = {s: mean_std(a) for s in strategies if len(a := accuracies(results, model, keep, s, schedule)) >= 3}
    if len(stats) < 2:
        return "one strategy measured" if stats else "no strategy with 3 seeds"
    ranked = sorted(stats, key=lambda s: -stats[s][0])
    best, second = ranked[0], ranked[1]
    gap, bar = stats[best][0] - stats[second][0], 2 * max(stats[best][1], stats[second][1])
    if gap > bar:
        return f"**{best}** ahead of {second} by {gap:.2f} pt (> 2 std = {bar:.2f})"
    return f"no clear winner: {best} leads {second} by {gap:.2f} pt, within 2 std ({bar:.2f})"


def readme_table(results: list[dict], schedule: str = "defaults") -> list[str]:
    """A README accuracy table: mean ± std over seeds and the drop against the control, per model and keep."""
    rows = [r for r in results if r["schedule"] == schedule]
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    lines = ["| model (binary, Fashion-MNIST) | keep | " + " | ".join(f"`{s}`" for s in strategies) + " | winner |",
             "|---" * (len(strategies) + 3) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        control = accuracies(results, model, 1.0, CONTROL, schedule)
        if len(control) < 3 or not any(r["model"] == model and r["keep"] < 1 for r in rows):
            continue  # a control alone (e.g. the slim architecture trained from scratch) is in the report only
        c_mean, c_std = mean_std(control)
        lines.append(f"| {model} | 1.0 (control) | {c_mean:.2f} ± {c_std:.2f} |" + " |" * len(strategies))
        for keep in sorted({r["keep"] for r in rows if r["model"] == model and r["keep"] < 1}, reverse=True):
            row = []
            for s in strategies:
                accs = accuracies(results, model, keep, s, schedule)
                if not accs:
                    row.append("")
                    continue
                m, sd = mean_std(accs)
                few = "" if len(accs) >= 3 else f" [{len(accs)} seed{'s' if len(accs) > 1 else ''}]"
                row.append(f"{m:.2f} ± {sd:.2f} ({m - c_mean:+.2f}){few}")
            won = verdict(results, model, keep, strategies, schedule)
            lines.append(f"| {model} | {keep} | " + " | ".join(row) + f" | {won} |")
    return lines


def update_readme(readme: Path, results: list[dict]) -> None:
    """Rewrite the README's accuracy tables (each between its markers) from the recorded results."""
    text = readme.read_text()
    for schedule, (start, end) in README_TABLES.items():
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + start + "\n" + "\n".join(readme_table(results, schedule)) + "\n" + end + tail
    readme.write_text(text)


def ops_fraction(run: Path, masks: dict[str, torch.Tensor]) -> float:
    """Binary operations kept, counted as the export report counts them."""
    from bnnslim.graph import build_graph
    from bnnslim.prune.budget import CostModel
    from bnnslim.prune.groups import find_groups
    from bnnslim.run_model import load_run_model
    from bnnslim.rundir import RunDir

    loaded = load_run_model(RunDir(run))
    example = loaded.example()
    groups = find_groups(loaded.model, build_graph(loaded.model, example), example).groups
    costs = CostModel(groups, "ops", loaded.model, example)
    return costs.cost([int(masks[g.id].sum()) if g.id in masks else g.size for g in groups]) / costs.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small_cnn.py"], help="example[@width]")
    parser.add_argument("--base", type=Path, nargs="*", default=[],
                        help="already trained binary runs, one per model (else trained here)")
    parser.add_argument("--base-label", default=None, help="how the report names a --base network")
    parser.add_argument("--epochs", type=int, default=4, help="binary main network epochs (when trained here)")
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.8, 0.5, 0.3], help="none: the control only")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES, help="none: the control only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--select-steps", type=int, default=None, help="default: bnnslim prune's")
    parser.add_argument("--retrain-steps", type=int, default=None)
    parser.add_argument("--retrain-scope", default=None, help="upward or all (default: bnnslim prune's)")
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--finetune-lr", type=float, default=None)
    parser.add_argument("--distill", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--teacher", default=None, help="float teacher weights (default: the unpruned binary network)")
    parser.add_argument("--max-shift", type=float, default=None)
    parser.add_argument("--budget", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bnnslim-bench-prune-accuracy"))
    parser.add_argument("--results", type=Path, default=HERE / "prune_accuracy.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "prune_accuracy.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite --out from --results")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite this README's accuracy table (between its prune-accuracy markers)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.teacher is not None and args.distill is None:
        args.distill = 1.0  # as `bnnslim prune --teacher FILE` does
    overrides = {k: v for k, v in {"select_steps": args.select_steps, "retrain_steps": args.retrain_steps,
                                   "retrain_scope": args.retrain_scope,
                                   "finetune_steps": args.finetune_steps, "distill": args.distill,
                                   "lr": args.lr, "finetune_lr": args.finetune_lr, "temperature": args.temperature,
                                   "max_shift": args.max_shift, "budget": args.budget,
                                   "teacher": args.teacher}.items() if v is not None}
    defaults = {f.name: f.default for f in fields(PruneOptions)}
    # a schedule is named by what differs from bnnslim prune's defaults (an option given at its default is not)
    changed = {k: v for k, v in overrides.items() if v != defaults.get(k)}
    schedule = json.dumps(changed, sort_keys=True) if changed else "defaults"
    device = torch.device(args.device)
    results = load_results(args.results)
    done = {cell_key(r) for r in results}
    speed: dict[str, dict[str, float]] = {}
    for mi, spec in enumerate(args.models):
        path, label = model_file(args.work, spec)
        base = args.base[mi] if mi < len(args.base) else args.work / f"{path.stem}-base"
        if mi < len(args.base):
            label += f", base {args.base_label or base.name}"
        if not args.report_only and not (base / "binary.safetensors").is_file():
            t = time.perf_counter()
            trained = binarize(BinarizeOptions(model=str(path), run=base, data=args.data, data_root=args.data_root,
                                               device=args.device, overwrite=True,
                                               train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size)))
            print(f"{label}: binary network {trained.test_accuracy:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        if not args.report_only:
            speed[label] = step_times(base, device, args.batch_size)
            print(label, "step times", speed[label], flush=True)
        cells = [] if args.no_control else [(1.0, CONTROL)]
        cells += [(k, s) for k in args.keeps for s in args.strategies]
        for seed in args.seeds:
            for keep, strategy in cells:
                key = (label, keep, strategy, seed, schedule)
                if key in done or args.report_only:
                    continue
                run = args.work / f"{path.stem}-{strategy}-{keep}-s{seed}"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(base, run)
                opts = PruneOptions(keep=keep, strategy="bn" if strategy == CONTROL else strategy, seed=seed,
                                    batch_size=args.batch_size, device=args.device, data=args.data,
                                    data_root=str(args.data_root) if args.data_root else None, **overrides)
                t = time.perf_counter()
                r = prune(run, opts)
                record = {"model": label, "keep": keep, "strategy": strategy, "seed": seed, "schedule": schedule,
                          "options": json.loads(opts.resume_key()), "accuracy": r.accuracy_after,
                          "accuracy_before": r.accuracy_before, "kept_filters": r.kept_filters,
                          "total_filters": r.total_filters, "ops_fraction": ops_fraction(run, r.masks),
                          "seconds": time.perf_counter() - t, "finetune_seconds": r.finetune_seconds,
                          "groups": [asdict(g) for g in r.records], "time": time.strftime("%Y-%m-%d %H:%M")}
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                results.append(record)
                print(f"{label} keep {keep} {strategy} seed {seed}: {100 * r.accuracy_after:.2f} % "
                      f"({record['seconds']:.0f} s) split {[g.kept for g in r.records]}", flush=True)
                shutil.rmtree(run, ignore_errors=True)
    write_report(args, results, speed)
    if args.readme is not None:
        update_readme(args.readme, results)


def write_report(args: argparse.Namespace, results: list[dict], speed: dict[str, dict[str, float]]) -> None:
    out = [header("Prune accuracy: strategies x budgets x seeds, against a keep-1.0 control"), ""]
    for label in dict.fromkeys(r["model"] for r in results):
        for schedule in dict.fromkeys(r["schedule"] for r in results if r["model"] == label):
            out += [f"\n## {label}, schedule: {schedule}\n"]
            out += table(results, label, schedule, sorted({r["keep"] for r in results if r["keep"] < 1}, reverse=True),
                         [s for s in STRATEGIES if any(r["strategy"] == s for r in results)]
                         + sorted({r["strategy"] for r in results} - set(STRATEGIES) - {CONTROL}))
        if label in speed:
            s = speed[label]
            out.append(f"\nStep times at batch {args.batch_size}: plain training {1000 * s['plain']:.0f} ms; "
                       f"with the distillation teacher {1000 * s['distilled']:.0f} ms "
                       f"(**{s['distilled'] / s['plain']:.2f}x**); one selector-learning step (distilled) "
                       f"{1000 * s['select']:.0f} ms (**{s['select'] / s['plain']:.2f}x**).")
    out += ["\n## Summary (the README's tables)\n", "With the defaults:\n", *readme_table(results),
            f"\nWith {UPWARD} (the paper's rule; the default until 2026-12-03):\n", *readme_table(results, UPWARD)]
    write_record(args.out, "\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
