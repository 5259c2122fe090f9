"""Rank allocation under a parameter budget, whitened factors, no fine-tuning: which rule keeps the model's output?

Rules compared at 60%, 50%, 40% and 25% of the replaceable layers' parameters:

- ``greedy``: today's ``lr.factorize_(model, stats, param_budget=b, method="whiten")`` (least sum of per-layer
  relative errors);
- ``uniform``: one common tolerance on every layer's relative output error, bisected to meet the budget
  (``lr.allocation.allocate(..., rule="uniform")``);
- ``probe``: the new default, ``lr.allocation.allocate(..., probe=Probe(model, calibration))``;
- ``probe+layers``: the same with ``measure_layers=True`` (each layer also truncated alone for real),
  to show what those extra passes add.

Ranks of the last three are applied with ``lr.factorize_(copy, stats, ranks=..., method="whiten")``.
Models (``benchmarks/allocation_models.py``, trained here, seeded): the digits ViT of ``examples/digits.py``,
a CNN on digits, and a character-level transformer trained on Python's own docs (``pydoc_data.topics``).
Statistics and probes use 512 training examples (the LM: 256 windows of 64 characters); everything is
judged on held-out data: ``error`` is the relative squared error of the logits against the dense model,
``sum ||f' - f||^2 / sum ||f||^2``, and the task score is top-1 accuracy or per-character perplexity.

Also printed: what each rule cost (forward passes over a calibration batch, seconds) as a ratio to
``lr.analyze`` on the same model, how that grows with depth and width, and for the CNN what a
``param_budget`` and a ``macs_budget`` of 50% keep of each.

Timings are CPU seconds on one thread (``torch.set_num_threads(1)``), so they do not swing with other jobs.

Run: PYTHONPATH=. .venv/bin/python benchmarks/allocation.py   (about 8 minutes on two busy CPU cores;
``--cache DIR`` keeps the trained models for the next run)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks import allocation_models as models  # noqa: E402
from lightning_rank.allocation import allocate  # noqa: E402
from lightning_rank.probe import Probe  # noqa: E402
from lightning_rank.selection import layer_candidates  # noqa: E402

BUDGETS = (0.6, 0.5, 0.4, 0.25)
RULES = ("greedy", "uniform", "probe", "probe+layers")
RULE_OPTIONS = (("uniform", {"rule": "uniform"}), ("probe", {}), ("probe+layers", {"measure_layers": True}))


def apply(task: models.Task, stats, candidates, ranks: dict) -> torch.nn.Module:
    """A copy of the model with ``ranks`` applied (layers not given a rank stay dense)."""
    model = copy.deepcopy(task.model)
    full = {name: ranks.get(name) or min(c.shape) for name, c in candidates.items()}
    lr.factorize_(model, stats, ranks=full, method="whiten")
    return model


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Least CPU seconds of ``repeat`` calls (one thread: CPU time does not depend on other jobs' load) and a result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def run(task: models.Task, budgets: tuple[float, ...], probe_batches: int) -> list[dict]:
    stats = lr.collect(task.model, task.calibration)
    analyze_s, _ = timed(lambda: lr.analyze(task.model, stats))
    candidates, left_out = layer_candidates(task.model, stats)
    dense = models.evaluate(task, task.model)
    rows = []
    for budget in budgets:
        row = {"task": task.name, "budget": budget, "dense": dense["score"], "analyze_s": analyze_s}
        greedy = copy.deepcopy(task.model)
        result = lr.factorize_(greedy, stats, param_budget=budget, method="whiten")
        row["greedy"] = models.evaluate(task, greedy, dense["logits"])
        row["greedy_kept"] = result.layer_params_after / result.layer_params_before
        for rule, options in RULE_OPTIONS:
            probe = Probe(task.model, task.calibration[:probe_batches])  # fresh: its cost is counted in full
            seconds, allocation = timed(lambda: allocate(candidates, param_budget=budget, probe=probe, **options), 1)
            compressed = apply(task, stats, candidates, allocation.ranks)
            row[rule] = models.evaluate(task, compressed, dense["logits"])
            row[f"{rule}_kept"] = allocation.kept / allocation.base
            row[f"{rule}_cost"] = (allocation.probe_passes, seconds)
            row[f"{rule}_chosen"] = allocation.rule
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | kept | dense | " + " | ".join(f"{r} error / score" for r in RULES) + " | probe vs uniform error |",
        "|---|---:|---:|" + "---:|" * len(RULES) + "---:|",
    ]
    for row in rows:
        lm = "LM" in row["task"]
        fmt = (lambda s: f"{s:.3f}") if lm else (lambda s: f"{100 * s:.1f}%")
        cells = []
        best = min(row[r]["error"] for r in RULES)
        for rule in RULES:
            mark = "**" if row[rule]["error"] == best else ""
            cells.append(f"{mark}{row[rule]['error']:.3g}{mark} / {fmt(row[rule]['score'])}")
        gain = 1 - row["probe"]["error"] / row["uniform"]["error"]
        lines.append(
            f"| {row['task']} | {row['budget']:.0%} | {fmt(row['dense'])} | " + " | ".join(cells) + f" | {-gain:+.0%} |"
        )
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    lines = ["| model | kept | analyze CPU s | probe passes | probe CPU s | probe / analyze | probe+layers passes | "
             "probe+layers / analyze | returned |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        (passes, seconds), (lpasses, lseconds) = row["probe_cost"], row["probe+layers_cost"]
        lines.append(
            f"| {row['task']} | {row['budget']:.0%} | {row['analyze_s']:.3f} | {passes} | {seconds:.2f} | "
            f"{seconds / row['analyze_s']:.1f}x | {lpasses} | {lseconds / row['analyze_s']:.1f}x | {row['probe_chosen']} |"
        )
    return "\n".join(lines)


def scaling() -> str:
    """Cost of the probe rule against ``analyze`` on random-init digits ViTs of growing depth and width."""
    calibration, _ = models._split_batches(models._digits(0))
    lines = ["| depth | dim | layers | probe passes | analyze s | probe s | ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for depth, dim in ((2, 64), (4, 64), (8, 64), (2, 128), (2, 256)):
        L.seed_everything(0, verbose=False)
        model = models.DigitsViT(dim=dim, depth=depth).eval()
        stats = lr.collect(model, calibration)
        analyze_s, _ = timed(lambda: lr.analyze(model, stats))
        candidates, _ = layer_candidates(model, stats)
        seconds, allocation = timed(lambda: allocate(candidates, param_budget=0.5, probe=Probe(model, calibration)), 1)
        lines.append(
            f"| {depth} | {dim} | {len(candidates)} | {allocation.probe_passes} | {analyze_s:.3f} | {seconds:.2f} | "
            f"{seconds / analyze_s:.1f}x |"
        )
    return "\n".join(lines)


def macs_versus_params(task: models.Task) -> str:
    stats = lr.collect(task.model, task.calibration)
    candidates, _ = layer_candidates(task.model, stats)
    positions = Probe(task.model, task.calibration).positions({n: c.target for n, c in candidates.items()})
    for name, c in candidates.items():
        c.positions = positions[name]
    dense = models.evaluate(task, task.model)
    lines = ["| budget | params kept | MACs kept | error | accuracy | ranks |", "|---|---:|---:|---:|---:|---|"]
    for label, kwargs in (("param_budget=0.5", {"param_budget": 0.5}), ("macs_budget=0.5", {"macs_budget": 0.5})):
        allocation = allocate(candidates, probe=Probe(task.model, task.calibration), **kwargs)
        params = sum(d.params for d in allocation.layers.values()) / sum(d.dense_params for d in allocation.layers.values())
        macs = sum(d.macs for d in allocation.layers.values()) / sum(d.dense_macs for d in allocation.layers.values())
        result = models.evaluate(task, apply(task, stats, candidates, allocation.ranks), dense["logits"])
        ranks = ", ".join(f"{n}={d.rank if d.rank is not None else 'dense'}" for n, d in allocation.layers.items())
        lines.append(f"| {label} | {params:.1%} | {macs:.1%} | {result['error']:.4f} | {result['score']:.1%} | {ranks} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--probe-batches", type=int, default=4, help="calibration batches the probe runs on (of 4)")
    parser.add_argument("--models", nargs="+", default=["digits_vit", "digits_cnn", "char_lm"])
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the trained models in between runs")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # two busy cores: more threads only spin, and CPU times stay comparable
    started = time.perf_counter()
    rows = []
    tasks = []
    for name in args.models:
        cached = args.cache / f"{name}.pt" if args.cache is not None else None
        if cached is not None and cached.exists():
            task = torch.load(cached, weights_only=False)
        else:
            task = getattr(models, name)()
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(task, cached)
        tasks.append(task)
        rows += run(task, tuple(args.budgets), args.probe_batches)
        print(f"[{time.perf_counter() - started:.0f}s] {task.name} done", flush=True)
    print("\nModel-output error (relative squared error of the logits vs dense, held-out) / task score "
          "(top-1, or perplexity for the LM); best error in bold\n")
    print(table(rows))
    print("\nAllocation cost (one allocate call from scratch, CPU seconds on one thread; returned: the rule whose "
          "ranks the probe rule returned after its check against uniform tolerance)\n")
    print(cost_table(rows))
    cnn = [task for task in tasks if "CNN" in task.name]
    if cnn:
        print("\nParameters vs multiply-adds on the digits CNN (probe rule)\n")
        print(macs_versus_params(cnn[0]))
    if not args.skip_scaling:
        print("\nCost growth with depth and width (random-init digits ViTs, param_budget=0.5)\n")
        print(scaling())
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
