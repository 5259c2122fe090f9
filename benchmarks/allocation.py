"""Rank allocation under a parameter budget, whitened factors, no fine-tuning: which rule keeps the model's output?

Rules compared at 60%, 50%, 40% and 25% of the replaceable layers' parameters:

- ``uniform``: one common tolerance on every layer's relative output error, bisected to meet the budget
  (``allocation="uniform"``, what ``factorize_`` does with no calibration batch at all): the floor;
- ``probe (plain)``: the probe rule on plain whitened truncations (``allocate(..., output_weighted=False)``,
  the default before output weighting), applied with ``factorize_(ranks=..., method="whiten")``;
- ``probe``: the default, ``lr.factorize_(model, stats, param_budget=b, method="whiten", calibration=batches)``
  (without ``calibration=``, on the first 4 batches ``lr.collect`` kept): truncations weighted by the model-output gradient moment at
  each layer's output, ranks allocated on their linearized end-to-end damage, checked against uniform.

The probe runs on the first ``--probe-batches`` calibration batches (default 1: 128 images, or 64 sequences).
Models (``benchmarks/allocation_models.py``, trained here, seeded): the digits ViT of ``examples/digits.py``,
a CNN on digits, and a character-level transformer trained on Python's own docs (``pydoc_data.topics``).
Statistics and probes use 512 training examples (the LM: 256 windows of 64 characters); everything is
judged on held-out data: ``error`` is the relative squared error of the logits against the dense model,
``sum ||f' - f||^2 / sum ||f||^2``, and the task score is top-1 accuracy or per-character perplexity.

Also printed: what each rule cost (forward passes over a calibration batch, seconds) as a ratio to
``lr.analyze`` on the same model, how that grows with depth and width, and for the CNN what a
``param_budget`` and a ``macs_budget`` of 50% keep of each.

Timings are CPU seconds on one thread (``torch.set_num_threads(1)``), so they do not swing with other jobs.

``--plain``: only what the plain call ``lr.factorize_(model, stats, param_budget=b)`` gives (the budget shared
out on the first batches ``lr.collect`` kept) against uniform tolerance and against the same call given those
batches explicitly (``calibration=task.calibration[:4]``, ``forward`` as collect's): the plain call must match it.

Run: PYTHONPATH=. .venv/bin/python benchmarks/allocation.py   (about 7 minutes on two busy CPU cores, 2 of them
for the ViT-B-shaped encoders, which `--skip-wide` leaves out;
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
from lightning_rank.compress.allocation import allocate  # noqa: E402
from lightning_rank.compress.probe import Probe  # noqa: E402
from tests.helpers import layer_candidates  # noqa: E402

BUDGETS = (0.6, 0.5, 0.4, 0.25)
RULES = ("uniform", "probe (plain)", "probe")


def apply(task: models.Task, stats, candidates, ranks: dict) -> torch.nn.Module:
    """A copy of the model with ``ranks`` applied (layers not given a rank stay dense)."""
    model = copy.deepcopy(task.model)
    full = {name: ranks.get(name) or min(c.shape) for name, c in candidates.items()}
    lr.factorize_(model, stats, ranks=full, method="whiten", progress=False)
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
    collect_s, stats = timed(lambda: lr.collect(task.model, task.calibration))
    analyze_s, _ = timed(lambda: lr.analyze(task.model, stats, progress=False))
    candidates, left_out = layer_candidates(task.model, stats)
    calibration = task.calibration[:probe_batches]
    dense = models.evaluate(task, task.model)
    rows = []
    for budget in budgets:
        row = {"task": task.name, "budget": budget, "dense": dense["score"], "analyze_s": analyze_s,
               "collect_s": collect_s}
        compressed = copy.deepcopy(task.model)
        lr.factorize_(compressed, stats, param_budget=budget, method="whiten", allocation="uniform", progress=False)
        row["uniform"] = models.evaluate(task, compressed, dense["logits"])
        for rule, options in (("probe (plain)", {"output_weighted": False}), ("probe", {})):
            probe = Probe(task.model, calibration)  # fresh: its cost is counted in full
            seconds, allocation = timed(lambda: allocate(candidates, param_budget=budget, probe=probe, **options), 1)
            row[f"{rule}_cost"] = (allocation.probe_passes, seconds)
            row[f"{rule}_chosen"] = allocation.rule
            if options:
                compressed = apply(task, stats, candidates, allocation.ranks)
            else:  # what a user runs; the planner allocates exactly as the timed call did
                compressed = copy.deepcopy(task.model)
                result = lr.factorize_(compressed, stats, param_budget=budget, method="whiten", calibration=calibration,
                                       progress=False)
                assert result.layers == allocation.ranks, (result.layers, allocation.ranks)
            row[rule] = models.evaluate(task, compressed, dense["logits"])
        rows.append(row)
    return rows


def plain_call(task: models.Task, budgets: tuple[float, ...]) -> list[str]:
    """Rows of the ``--plain`` table: uniform tolerance, the plain call and the explicitly calibrated call."""
    stats = lr.collect(task.model, task.calibration)
    kept = len(stats.calibration)
    dense = models.evaluate(task, task.model)
    fmt = (lambda s: f"{s:.3f}") if task.kind == "lm" else (lambda s: f"{100 * s:.1f}%")
    lines = []
    for budget in budgets:
        results, judged = {}, {}
        for label, options in (("uniform", {"allocation": "uniform"}), ("plain", {}),
                               ("calibrated", {"calibration": task.calibration[:kept]})):
            compressed = copy.deepcopy(task.model)
            results[label] = lr.factorize_(compressed, stats, param_budget=budget, progress=False, **options)
            judged[label] = models.evaluate(task, compressed, dense["logits"])
        same = results["plain"].layers == results["calibrated"].layers and (
            judged["plain"]["error"] == judged["calibrated"]["error"])
        assert same, (results["plain"].layers, results["calibrated"].layers)
        cells = " | ".join(f"{judged[k]['error']:.4g} / {fmt(judged[k]['score'])}" for k in ("uniform", "plain",
                                                                                            "calibrated"))
        lines.append(f"| {task.name} | {budget:.0%} | {fmt(dense['score'])} | {cells} | "
                     f"{judged['plain']['error'] / judged['uniform']['error']:.2f} | {results['plain'].allocation} | "
                     f"{'yes' if same else 'NO'} |")
    return lines


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
    lines = ["| model | kept | collect CPU s | analyze CPU s | plain probe passes | plain / analyze | probe passes | "
             "probe CPU s | probe / analyze | probe / (collect + analyze) | returned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        (ppasses, pseconds), (passes, seconds) = row["probe (plain)_cost"], row["probe_cost"]
        lines.append(
            f"| {row['task']} | {row['budget']:.0%} | {row['collect_s']:.3f} | {row['analyze_s']:.3f} | {ppasses} | "
            f"{pseconds / row['analyze_s']:.1f}x | {passes} | {seconds:.2f} | {seconds / row['analyze_s']:.1f}x | "
            f"{seconds / (row['collect_s'] + row['analyze_s']):.1f}x | {row['probe_chosen']} |"
        )
    return "\n".join(lines)


def scaling(wide: bool) -> str:
    """Cost of the probe rule against ``analyze``: random-init digits ViTs of growing depth and width (statistics
    on 512 images, the probe on 128), and ViT-B/16-shaped encoders with random weights (``dim`` 512 or 768, MLP
    4x, 197 tokens; statistics on 16 sequences, the probe on 8)."""
    calibration, _ = models._split_batches(models._digits(0))
    configs = [("digits ViT", depth, dim) for depth, dim in ((2, 64), (4, 64), (8, 64), (2, 128), (2, 256))]
    if wide:
        configs += [("ViT-B-shaped", depth, dim) for depth, dim in ((1, 512), (2, 512), (1, 768), (2, 768))]
    lines = ["| model | depth | dim | layers | probe passes | analyze CPU s | probe CPU s | probe / analyze |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for family, depth, dim in configs:
        L.seed_everything(0, verbose=False)
        if family == "digits ViT":
            model, batches = models.DigitsViT(dim=dim, depth=depth).eval(), calibration
        else:
            model, batches = models.WideEncoder(dim, depth, heads=dim // 64).eval(), models.wide_batches(dim, 2)
        stats = lr.collect(model, batches)
        analyze_s, _ = timed(lambda: lr.analyze(model, stats, progress=False), 1 if family != "digits ViT" else 3)
        candidates, _ = layer_candidates(model, stats)
        seconds, allocation = timed(lambda: allocate(candidates, param_budget=0.5, probe=Probe(model, batches[:1])), 1)
        lines.append(
            f"| {family} | {depth} | {dim} | {len(candidates)} | {allocation.probe_passes} | {analyze_s:.3f} | "
            f"{seconds:.2f} | {seconds / analyze_s:.1f}x |"
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
        allocation = allocate(candidates, probe=Probe(task.model, task.calibration[:1]), **kwargs)
        params = sum(d.params for d in allocation.layers.values()) / sum(d.dense_params for d in allocation.layers.values())
        macs = sum(d.macs for d in allocation.layers.values()) / sum(d.dense_macs for d in allocation.layers.values())
        compressed = copy.deepcopy(task.model)
        planned = lr.factorize_(compressed, stats, method="whiten", calibration=task.calibration[:1], progress=False,
                                   **kwargs)
        assert planned.layers == allocation.ranks, (planned.layers, allocation.ranks)
        result = models.evaluate(task, compressed, dense["logits"])
        ranks = ", ".join(f"{n}={d.rank if d.rank is not None else 'dense'}" for n, d in allocation.layers.items())
        lines.append(f"| {label} | {params:.1%} | {macs:.1%} | {result['error']:.4f} | {result['score']:.1%} | {ranks} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-wide", action="store_true", help="no ViT-B-shaped encoders in the cost growth table")
    parser.add_argument("--probe-batches", type=int, default=1, help="calibration batches the probe runs on (of 4)")
    parser.add_argument("--models", nargs="+", default=["digits_vit", "digits_cnn", "char_lm"])
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the trained models in between runs")
    parser.add_argument("--plain", action="store_true", help="only the plain factorize_(param_budget=...) call against "
                        "uniform tolerance and the explicitly calibrated call")
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
        if args.plain:
            rows += plain_call(task, tuple(args.budgets))
            continue
        rows += run(task, tuple(args.budgets), args.probe_batches)
        print(f"[{time.perf_counter() - started:.0f}s] {task.name} done", flush=True)
    if args.plain:
        print("\nThe plain call lr.factorize_(model, stats, param_budget=b) (method 'whiten'; the budget shared out on "
              "the 4 batches lr.collect kept) vs uniform tolerance (allocation='uniform') and vs the same call with "
              "calibration= those 4 batches. Error: relative squared error of the logits vs dense, held-out / task "
              "score (top-1, or perplexity for the LM)\n")
        print("| model | kept | dense | uniform | plain call | calibrated call | plain / uniform error | rule | "
              "plain = calibrated |\n|---|---:|---:|---:|---:|---:|---:|---|---|")
        print("\n".join(rows))
        print(f"\ntotal {time.perf_counter() - started:.0f}s")
        return
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
        print("\nCost growth with depth and width (random weights, param_budget=0.5)\n")
        print(scaling(wide=not args.skip_wide))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
