"""Helpers shared by the tests: independent references to check results against, TensorBoard's reader of a run's
event files, a fake clock for the monitor, and the planner's candidates (which benchmarks/allocation.py uses too).
Models, data and the Trainer factory are in tests/tiny_models.py."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn

import lightning_rank as lr
from lightning_rank.callbacks import monitor as monitor_module
from lightning_rank.compress.candidates import LayerCandidate
from lightning_rank.compress.planning import Replaceable, candidate, decompositions
from lightning_rank.compress.selection import factorization_targets, shared_weights, why_not_replaceable
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import ModuleSelector


def layer_candidates(
    model: nn.Module, stats: ActivationStatistics, *, exclude_modules: ModuleSelector = None
) -> tuple[dict[str, LayerCandidate], dict[str, str]]:
    """The replaceable layers among those ``stats`` holds as allocation candidates, as the planner builds them, and
    ``{name: reason}`` of the layers left out of a budget's base."""
    targets, left_out = factorization_targets(model, stats, None, exclude_modules)
    left_out = dict(left_out)
    shared = shared_weights(model)
    replaceable = {}
    for name, target in targets.items():
        reason = why_not_replaceable(name, target, stats, shared)
        if reason is None:
            replaceable[name] = target
        else:
            left_out[name] = reason
    spectra = decompositions(model, stats, replaceable, 0.99, with_ranks=False, with_output_basis=False)
    candidates = {}
    for name, target in replaceable.items():
        entry = candidate(name, Replaceable(target, spectra[name]))
        if entry.max_rank < 1:
            left_out[name] = f"no rank saves parameters on its {entry.shape[0]} x {entry.shape[1]} weight"
        else:
            candidates[name] = entry
    return candidates, left_out


# -- references: reports, input statistics, energy ranks ---------------------------------------------------------
def reference(model: nn.Module, loaders, **collect_kwargs) -> dict:
    """The report of an independent collect + analyze over every batch of ``loaders``."""
    batches = [batch for loader in loaders for batch in loader]
    threshold = collect_kwargs.pop("threshold", 0.99)
    stats = lr.collect(model, batches, forward=lambda m, b: m(b[0]), **collect_kwargs)
    return lr.analyze(model, stats, threshold=threshold).to_dict()


def assert_same_report(actual: dict, expected: dict) -> None:
    """Two reports (``to_dict()``) agree: every layer's every entry, and the MLU."""
    assert actual["layers"].keys() == expected["layers"].keys()
    for name, layer in expected["layers"].items():
        for key, value in layer.items():
            if isinstance(value, float):
                assert actual["layers"][name][key] == pytest.approx(value, rel=1e-9), (name, key)
            else:
                assert actual["layers"][name][key] == value, (name, key)
    assert actual["mlu"] == pytest.approx(expected["mlu"], rel=1e-9)


def pooled(report: dict) -> dict:
    """A one-process report (``to_dict()``) as several processes give it when each analyzed layer's rows were summed
    over every process (``pooled``: each process's share held fewer rows than the row budget, or every row counted)."""
    for layer in report["layers"].values():
        layer["pooled"] = True if layer["skipped"] is None else None
    return report


def moments_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Gram matrix, sum and count of ``rows`` (its last dim the features), in float64."""
    rows = rows.double().reshape(-1, rows.shape[-1])
    return rows.t() @ rows, rows.sum(0), rows.shape[0]


def assert_stats(stats: lr.InputStatistics, rows: torch.Tensor, rtol: float = 1e-5) -> None:
    gram, total, count = moments_reference(rows)
    assert int(stats.count) == count
    scale = gram.abs().max().item() + 1e-12
    torch.testing.assert_close(stats.gram.double(), gram, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(stats.total.double(), total, rtol=rtol, atol=rtol * (total.abs().max().item() + 1e-12))


def patches_reference(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Receptive-field patches by explicit slicing (no unfold), ordered (C, kh, kw) like the weight."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = x[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


CONV_GEOMETRIES = [  # stride, padding (also "same" and non-zero modes), dilation, non-square kernels
    dict(kernel_size=3, stride=2, padding=1, dilation=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect", stride=2),
]


def acceptable_energy_ranks(values: list[float], t: float, slack: float = 1e-9) -> set[int]:
    """Every k whose top k hold t of the trace, in exact rational arithmetic, while its top k - 1 do not, both
    within a relative ``slack`` (float sums round, subnormal ones coarsely; threshold 1.0 must not count round-off)."""
    top = sorted((Fraction(max(v, 0.0)) for v in values), reverse=True)
    target = Fraction(t) * sum(top)
    if target == 0:
        return {0}
    prefixes = [sum(top[:k]) for k in range(len(top) + 1)]
    return {k for k in range(1, len(top) + 1)
            if prefixes[k] >= target * Fraction(1 - slack) and prefixes[k - 1] < target * Fraction(1 + slack)}


def brute_energy_rank(values: list[float], t: float) -> int:
    """The smallest acceptable energy rank: the exact one, up to the slack."""
    return min(acceptable_energy_ranks(values, t))


# -- a model left as it was -----------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    return dict(model.named_modules()), {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[dict[str, nn.Module], dict[str, torch.Tensor]]) -> None:
    modules, state = before
    now = dict(model.named_modules())
    assert now.keys() == modules.keys() and all(now[name] is modules[name] for name in modules)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# -- what TensorBoard reads, and the monitor's clock ----------------------------------------------------------
class Events:
    """The event files of one run as TensorBoard reads them: tags per plugin, points, descriptions."""

    def __init__(self, log_dir) -> None:
        self.acc = plugin_event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
        self.acc.Reload()

    def _events(self, tag: str) -> list:
        """The events of ``tag`` in the order they were written. The accumulator reads the files by name, and a
        process's files made within one second differ only by a counter compared as text ("10" < "9")."""
        return sorted(self.acc.Tensors(tag), key=lambda event: event.wall_time)

    def tags(self, plugin: str) -> list[str]:
        try:
            return sorted(self.acc.PluginTagToContent(plugin))
        except KeyError:
            return []

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in self._events(tag)]

    def images(self, tag: str) -> list[tuple[int, int, int]]:
        """(step, width, height) of each image."""
        return [(e.step, *map(int, e.tensor_proto.string_val[:2])) for e in self._events(tag)]

    def picture(self, tag: str, index: int = -1) -> np.ndarray:
        """The ``index``-th image of ``tag`` decoded from its PNG, as an RGB ``(H, W, 3)`` array."""
        png = self._events(tag)[index].tensor_proto.string_val[2]
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def histograms(self, tag: str) -> list[tuple[int, np.ndarray]]:
        """(step, buckets as rows [left, right, count])."""
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in self._events(tag)]

    def text(self, tag: str) -> list[tuple[int, str]]:
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in self._events(f"{tag}/text_summary")]

    def description(self, tag: str) -> str:
        return self.acc.SummaryMetadata(tag).summary_description

    def layout(self) -> layout_pb2.Layout:
        return layout_pb2.Layout.FromString(self._events("custom_scalars__config__")[-1].tensor_proto.string_val[0])


class FakeClock:
    """The monitor's clock (``monitor._clock``) for one test: it reads :attr:`now`, which moves only when the test
    says: by ``epoch_seconds`` when a training epoch starts and by ``batch_seconds`` after each training batch (pass
    :attr:`callback` to the Trainer), and by ``seconds`` each time a function that :meth:`slow` wraps is called."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, epoch_seconds: float = 0.0, batch_seconds: float = 0.0) -> None:
        self.now = 0.0
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(monitor_module, "_clock", lambda: self.now)
        self.callback = Callback()
        self.callback.on_train_epoch_start = lambda trainer, module: self.advance(epoch_seconds)
        self.callback.on_train_batch_end = lambda trainer, module, *_: self.advance(batch_seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def slow(self, owner: object, name: str, seconds: float) -> None:
        """``owner.name`` (a module's function) takes ``seconds`` on this clock, then runs as before."""
        original = getattr(owner, name)

        def slowed(*args, **kwargs):
            self.advance(seconds)
            return original(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, slowed)


# -- multi-process scripts (tests/ddp_scripts) --------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def load_script(script: Path) -> ModuleType:
    """A script of ``tests/ddp_scripts`` imported as a module (its models and data, for a reference in the test)."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script: Path, mode: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python script mode out`` in ``out`` as a Lightning launcher's first process (no leftover rank variables;
    the repository on the path, for the scripts' ``tests`` imports) and assert that it succeeded."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), mode, str(out)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"rank 0 failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done
