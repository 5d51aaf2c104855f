"""The degradation study (Fig. 1, Fig. 6 and Table 6 of the 2015 paper).

Plain and residual CIFAR nets of growing depth are trained under one recipe, each by the
public trainer in a workdir of its own (``<root>/<name>``), so a killed sweep continues
where it stopped: nets with a ``results.json`` are done and skipped, a half-trained net
resumes from its newest checkpoint (the trainer's own resume). The curves come from each
workdir's ``metrics.jsonl``, so figures and tables are rebuilt from the workdirs at any time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.errors import UsageError
from resnet_jax.train.metrics import read_metrics

log = logging.getLogger(__name__)

# Table 6 of He et al. 2015 (test error %, CIFAR-10, best of 5 runs for 110 is 6.43; the
# paper reports plain-net errors only as curves, Fig. 6).
PAPER_RESNET_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# github.com/akamaster/pytorch_resnet_cifar10, README (a PyTorch reimplementation, 200 epochs).
AKAMASTER_RESNET_ERROR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32, 1202: 6.18}

_NAME = re.compile(r"^(plain|resnet)(\d+)$")

TrainFn = Callable[[ml_collections.ConfigDict, str], Any]


def net_names(depths: Iterable[int], families: Sequence[str] = ("plain", "resnet")) -> list[str]:
    """['plain20', 'resnet20', 'plain32', ...]: the config names of configs/cifar10.py."""
    depths = list(depths)
    for d in depths:
        if not isinstance(d, int) or d < 8 or (d - 2) % 6:
            raise UsageError(f"depth {d!r} is not a CIFAR depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...)")
    for f in families:
        if f not in ("plain", "resnet"):
            raise UsageError(f"family {f!r} is not 'plain' or 'resnet'")
    return [f"{f}{d}" for d in depths for f in families]


def parse_name(name: str) -> tuple[str, int]:
    m = _NAME.match(name)
    if not m:
        raise UsageError(f"net name {name!r} is not plain<depth> or resnet<depth>")
    return m.group(1), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class Shortening:
    """The paper's recipe compressed to ``steps`` steps at batch ``batch``, for small machines.

    The learning rate follows the linear scaling rule (0.1 at batch 128); the two /10
    drops sit where the paper's do (at 1/2 and 3/4 of training: 32k and 48k of 64k), and
    ResNet-110's warm-up keeps its share of the schedule (400 of 64k).
    """

    steps: int
    batch: int = 128
    eval_every: int | None = None
    log_every: int | None = None

    def apply(self, config: ml_collections.ConfigDict) -> None:
        if self.steps < 4 or self.batch < 1:
            raise UsageError(f"steps={self.steps} must be >= 4 and batch={self.batch} >= 1")
        ref_steps = config.schedule.total_steps or 64_000
        scale = self.batch / config.reference_batch_size
        config.optimizer.learning_rate = config.optimizer.learning_rate * scale
        config.schedule.warmup_learning_rate = config.schedule.warmup_learning_rate * scale
        config.batch_size = self.batch
        config.reference_batch_size = self.batch  # the step counts below are at this batch
        fractions = [b / ref_steps for b in config.schedule.boundaries]
        config.schedule.total_steps = self.steps
        config.schedule.boundaries = tuple(max(1, round(f * self.steps)) for f in fractions)
        config.schedule.warmup_steps = round(config.schedule.warmup_steps / ref_steps * self.steps)
        evals = self.eval_every or max(1, self.steps // 16)
        logs = self.log_every or max(1, self.steps // 40)
        set_cadence(config, log_every=logs, eval_every=evals, checkpoint_every=evals)


def set_cadence(
    config: ml_collections.ConfigDict, log_every: int, eval_every: int, checkpoint_every: int
) -> None:
    """Sets the cadences and a steps_per_dispatch that divides all three (the trainer
    runs steps in chunks and logs/evaluates/saves only at chunk ends)."""
    k = math.gcd(math.gcd(log_every, eval_every), math.gcd(checkpoint_every, config.steps_per_dispatch))
    config.steps_per_dispatch = k
    config.log_every_steps = log_every
    config.eval_every_steps = eval_every
    config.checkpoint_every_steps = checkpoint_every


def full_schedule_cadence(config: ml_collections.ConfigDict) -> None:
    """Denser curves than the trainer's defaults for the paper's full schedule: the test
    error every 1k steps (64 points, as many as Fig. 6 shows) and the training error every 100."""
    total = config.schedule.total_steps
    scale = config.reference_batch_size / config.batch_size
    evals = max(1, round(1000 * scale))
    set_cadence(
        config,
        log_every=max(1, round(100 * scale)),
        eval_every=evals,
        checkpoint_every=max(evals, round(4000 * scale)) if total else evals,
    )


def run_sweep(
    names: Sequence[str],
    root: str | Path,
    make_config: Callable[[str], ml_collections.ConfigDict],
    train_fn: TrainFn | None = None,
) -> list[str]:
    """Trains every net of ``names`` whose workdir has no results.json; returns those trained.

    ``make_config(name)`` gives the full config of a net; ``train_fn(config, workdir)``
    defaults to ``resnet_jax.train.loop.train_and_evaluate`` (imported only when needed).
    """
    if train_fn is None:
        from resnet_jax.train.loop import train_and_evaluate

        train_fn = train_and_evaluate
    root = Path(root)
    for name in names:  # before anything trains: a table must not mix two experiments
        check_finished_config(root / name, make_config(name))
    trained = []
    for name in names:
        workdir = root / name
        if (workdir / "results.json").is_file():
            log.info("%s: done earlier (%s), skipped", name, workdir / "results.json")
            continue
        log.info("%s: training in %s", name, workdir)
        train_fn(make_config(name), str(workdir))
        trained.append(name)
    return trained


def read_run(workdir: str | Path) -> dict[str, Any] | None:
    """One trained workdir's curves, final and lowest evaluation errors and settings, from
    its ``metrics.jsonl``, ``results.json`` and ``config.json``; None before it has metrics.
    ``finished`` is whether results.json exists (the trainer writes it last)."""
    workdir = Path(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if not metrics_path.is_file():
        return None
    records = read_metrics(metrics_path)
    eval_split = "validation" if any(r["split"] == "validation" for r in records) else "test"
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").is_file() else {}
    return {
        "train": [[r["step"], r["error"]] for r in records if r["split"] == "train"],
        "test": [[r["step"], r["error"]] for r in records if r["split"] == eval_split],
        "eval_split": eval_split,
        "finished": results is not None,
        "final_error": results["final_error"] if results else None,
        "best_error": results["best_error"] if results else None,
        "steps": results["steps"] if results else None,
        "wall_clock_s": results["wall_clock_s"] if results else None,
        # The host name stays in the workdir; the figures' JSON goes into the repository.
        "hardware": (
            {k: v for k, v in results["hardware"].items() if k != "host"}
            if results and results.get("hardware")
            else None
        ),
        "seed": config.get("seed"),
        "batch_size": config.get("batch_size"),
        "train_subset": config.get("dataset", {}).get("train_subset"),
        "eval_subset": config.get("dataset", {}).get("eval_subset"),
    }


def check_finished_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a finished run (results.json) whose config.json differs from ``config`` in a
    field that changes results: skipping it would put another experiment's number in the
    table. (An unfinished run is checked by the trainer when it resumes.)"""
    stored_path = workdir / "config.json"
    if not (workdir / "results.json").is_file() or not stored_path.is_file():
        return
    from resnet_jax.files import to_json_compatible
    from resnet_jax.train import config as config_lib
    from resnet_jax.train.workdir import WorkdirError, config_differences

    diffs = config_differences(
        json.loads(stored_path.read_text()),
        to_json_compatible(config.to_dict()),  # as the trainer stored it
        ignore_keys=set(config_lib.RESUMABLE_CHANGES),
        added_defaults=config_lib.defaults(config.dataset.name).to_dict(),
    )
    if diffs:
        listed = "; ".join(f"{k}: {json.dumps(a)} there, {json.dumps(b)} now" for k, (a, b) in diffs.items())
        raise WorkdirError(
            f"{workdir} holds a finished run of a different config ({listed}); use another --workdir, "
            "or the options that run trained with"
        )


def collect(names: Sequence[str], root: str | Path) -> dict[str, Any]:
    """Curves and final errors of the nets that have a workdir under ``root``."""
    runs: dict[str, Any] = {}
    for name in names:
        family, depth = parse_name(name)
        run = read_run(Path(root) / name)
        if run is not None:
            runs[name] = {"family": family, "depth": depth, **run}
    return {
        "runs": runs,
        "paper_resnet_error": PAPER_RESNET_ERROR,
        "akamaster_resnet_error": AKAMASTER_RESNET_ERROR,
    }


def _pct(v: float | None) -> str:
    return "not run" if v is None else f"{100 * v:.2f}"


def markdown_table(data: Mapping[str, Any]) -> str:
    """Final test error (%) per depth, plain and ResNet, beside Table 6 and akamaster."""
    runs = data["runs"]
    depths = sorted({r["depth"] for r in runs.values()})
    paper = {int(k): v for k, v in data["paper_resnet_error"].items()}
    aka = {int(k): v for k, v in data["akamaster_resnet_error"].items()}
    lines = [
        "| depth | plain (here) | ResNet (here) | ResNet (paper, Table 6) | ResNet (akamaster) "
        "| steps here |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in depths:
        plain, res = runs.get(f"plain{d}"), runs.get(f"resnet{d}")
        steps = {r["steps"] for r in (plain, res) if r and r["steps"]}
        lines.append(
            f"| {d} | {_pct(plain and plain['final_error'])} | {_pct(res and res['final_error'])} | "
            f"{paper.get(d, '-')} | {aka.get(d, '-')} | {'/'.join(map(str, sorted(steps))) or '-'} |"
        )
    lines.append("")
    lines.append("Paper: plain nets get worse with depth (Fig. 6, left; no table gives their numbers).")
    return "\n".join(lines) + "\n"
