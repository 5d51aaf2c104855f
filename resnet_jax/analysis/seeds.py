"""One config trained under several seeds: the paper's "best (mean ± std)" of the final test error.

Each seed trains in a workdir of its own (``<root>/seed<k>``) through the degradation
sweep's machinery (``degradation.run_sweep``), so a killed sweep trains only what is
missing and resumes the seed it was training. The statistic is each seed's FINAL test
error (the evaluation at the last step): no step is chosen by its test error, because
the lowest of many test evaluations is an optimistically biased estimate (the test set
would then have selected the model), which inflates published CIFAR numbers. The
standard deviation is the sample one (divisor n - 1), the usual choice for a handful of
runs; the paper does not say which it used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resnet_jax.analysis.degradation import PAPER_RESNET_ERROR, read_run
from resnet_jax.errors import UsageError

# He et al. 2015, Table 6 and Section 4.2: ResNet-110 was run 5 times; "best (mean ± std)".
# The other depths are single figures (no spread given).
PAPER_RESNET110_MEAN_STD = (6.61, 0.16)
PAPER_SOURCE = "He et al. 2015, Table 6"
# The recipe those figures belong to: 64k iterations of batch 128 on all 50k training images.
PAPER_STEPS, PAPER_BATCH = 64_000, 128

STD_KIND = "sample standard deviation (divisor n - 1)"


def seed_names(seeds: Sequence[int]) -> list[str]:
    """['seed0', 'seed1', ...]: the sub-workdir of each seed."""
    for s in seeds:
        if not isinstance(s, int) or s < 0:
            raise UsageError(f"seed {s!r} is not an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds {list(seeds)} repeat one")
    return [f"seed{s}" for s in seeds]


def statistics(errors: Sequence[float]) -> dict[str, Any]:
    """Best (lowest), mean and sample std (n - 1; None for one value) of ``errors``."""
    errors = [float(e) for e in errors]
    n = len(errors)
    if not n:
        return {"n": 0, "best": None, "mean": None, "std": None, "std_kind": STD_KIND}
    mean = math.fsum(errors) / n
    std = math.sqrt(math.fsum((e - mean) ** 2 for e in errors) / (n - 1)) if n > 1 else None
    return {"n": n, "best": min(errors), "mean": mean, "std": std, "std_kind": STD_KIND}


def paper_figure(model: str, dataset: str) -> dict[str, Any] | None:
    """The paper's CIFAR-10 figure (test error %) for this net, where Table 6 gives one."""
    m = re.fullmatch(r"cifar_resnet(\d+)", model or "")
    if dataset != "cifar10" or not m or int(m.group(1)) not in PAPER_RESNET_ERROR:
        return None
    depth = int(m.group(1))
    mean, std = PAPER_RESNET110_MEAN_STD if depth == 110 else (None, None)
    return {
        "best": PAPER_RESNET_ERROR[depth],
        "mean": mean,
        "std": std,
        "runs": 5 if depth == 110 else None,
        "source": PAPER_SOURCE,
        "steps": PAPER_STEPS,
        "batch_size": PAPER_BATCH,
    }


def collect(root: str | Path, seeds: Sequence[int], config: Mapping[str, Any]) -> dict[str, Any]:
    """Per-seed curves and final errors under ``root``, their statistics and the paper's figure.

    ``config`` is the config the seeds were trained with (its model and dataset name the
    paper's figure). Only finished seeds (results.json) enter the statistics.
    """
    runs = {}
    for seed, name in zip(seeds, seed_names(seeds)):
        run = read_run(Path(root) / name)
        if run is not None:
            runs[name] = {**run, "seed": seed}
    finished = [r for r in runs.values() if r["finished"]]
    model, dataset = config["model"]["name"], config["dataset"]["name"]
    return {
        "model": model,
        "dataset": dataset,
        "eval_split": finished[0]["eval_split"] if finished else "test",
        "seeds": list(seeds),
        "runs": runs,
        "statistic": "final evaluation error of each seed (no step selected on the evaluation set)",
        "summary": statistics([r["final_error"] for r in finished]),
        # For contrast only: each seed's lowest error over all evaluations, i.e. the step a
        # test-set selection would have picked. Never the reported figure.
        "summary_if_selected_on_test": statistics([r["best_error"] for r in finished]),
        "paper": paper_figure(model, dataset),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def best_mean_std(summary: Mapping[str, Any], scale: float = 100.0) -> str:
    """'6.43 (6.61 ± 0.16)': the paper's format (in % with the default scale); a figure with
    no mean is the best alone, and one seed has no spread."""
    if summary.get("best") is None:
        return "-"
    best = f"{scale * summary['best']:.2f}"
    if summary.get("mean") is None:
        return best
    if summary.get("std") is None:
        return f"{best} (one seed: no spread)"
    return f"{best} ({scale * summary['mean']:.2f} ± {scale * summary['std']:.2f})"


def _paper_cell(paper: Mapping[str, Any] | None) -> str:
    if paper is None:
        return "not reported"
    return best_mean_std(paper, scale=1.0)  # the paper's figures are in % already


def _caveats(data: Mapping[str, Any]) -> list[str]:
    """What makes this table's numbers and the paper's figure differ in kind, said under it."""
    finished = [r for r in data["runs"].values() if r["finished"]]
    notes = []
    paper = data["paper"]
    if paper and finished:
        examples = {r["steps"] * (r["batch_size"] or 0) for r in finished}
        if examples != {paper["steps"] * paper["batch_size"]}:
            notes.append(
                f"The paper's figure is for {paper['steps']:,} steps of batch {paper['batch_size']}; these "
                "runs are shorter or longer (see 'steps'), so the two columns are not comparable."
            )
    if any(r["train_subset"] for r in finished):
        notes.append(f"Trained on the first {finished[0]['train_subset']:,} training images only.")
    if any(r["eval_subset"] for r in finished):
        notes.append(f"Evaluated on the first {finished[0]['eval_subset']:,} test images only.")
    return notes


def markdown_table(data: Mapping[str, Any]) -> str:
    """The summary row beside the paper's figure, then one row per seed."""
    split = data["eval_split"]
    s = data["summary"]
    finished = [r for r in data["runs"].values() if r["finished"]]
    steps = "/".join(str(x) for x in sorted({r["steps"] for r in finished})) or "-"
    paper_source = data["paper"]["source"] if data["paper"] else "paper"
    lines = [
        f"{data['dataset']} {split} error (%) of {data['model']}: the final evaluation of each seed "
        f"(no step selected on the {split} set), best (mean ± std) over seeds, std the {STD_KIND}.",
        "",
        f"| net | seeds finished | steps | here: best (mean ± std) | {paper_source} |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| {data['model']} | {s['n']} of {len(data['seeds'])} | {steps} | {best_mean_std(s)} "
        f"| {_paper_cell(data['paper'])} |",
        "",
        f"| seed | final {split} error (%) | lowest {split} error at any evaluation (%), for contrast "
        "| steps |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for name in (f"seed{k}" for k in data["seeds"]):
        run = data["runs"].get(name)
        if run is None or not run["finished"]:
            state = "not started" if run is None else "unfinished"
            lines.append(f"| {name[4:]} | {state} | - | - |")
        else:
            lines.append(
                f"| {run['seed']} | {_pct(run['final_error'])} | {_pct(run['best_error'])} | {run['steps']} |"
            )
    lines.append("")
    selected = data["summary_if_selected_on_test"]
    if selected["n"]:
        lines.append(
            f"Picking each seed's lowest {split} error instead would report {best_mean_std(selected)}: "
            f"that step was chosen by the {split} set itself, so it is not used."
        )
    lines.extend(_caveats(data))
    return "\n".join(lines) + "\n"
