"""Figures drawn from the JSON the analyses write, so a figure can be redrawn without
rerunning anything. matplotlib is the ``[plots]`` extra and is imported here only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resnet_jax.errors import UserError


class MatplotlibMissingError(UserError, ImportError):
    """The ``[plots]`` extra (matplotlib) is not installed; exit status 2."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # one clear line instead of a traceback deep in a plot
        raise MatplotlibMissingError(
            'drawing figures needs matplotlib: pip install "deep-residual-jax[plots]"'
        ) from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _depth_colors(depths: Sequence[int]) -> dict[int, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {d: cmap(i % 10) for i, d in enumerate(sorted(depths))}


def degradation(
    data: Mapping[str, Any],
    path: str | Path,
    families: Sequence[str] = ("plain", "resnet"),
    title: str | None = None,
) -> Path:
    """Fig. 6 of the paper: per family a panel of error (%) against iterations; thin lines
    training error, bold lines test error, one colour per depth."""
    plt = _pyplot()
    runs = data["runs"]
    fams = [f for f in families if any(r["family"] == f for r in runs.values())]
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4), squeeze=False, sharey=True)
    colors = _depth_colors({r["depth"] for r in runs.values()})
    for ax, fam in zip(axes[0], fams):
        for run in sorted((r for r in runs.values() if r["family"] == fam), key=lambda r: r["depth"]):
            c = colors[run["depth"]]
            label = f"{'plain' if fam == 'plain' else 'ResNet'}-{run['depth']}"
            if run["train"]:
                s, e = zip(*run["train"])
                ax.plot(s, [100 * v for v in e], color=c, lw=0.8, alpha=0.8)
            if run["test"]:
                s, e = zip(*run["test"])
                ax.plot(s, [100 * v for v in e], color=c, lw=2.2, label=label)
        ax.set_title("plain networks" if fam == "plain" else "ResNets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)  (thin: training, bold: test)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def degradation_fig1(
    data: Mapping[str, Any],
    path: str | Path,
    shallow: str = "plain20",
    deep: str = "plain56",
    title: str | None = None,
) -> Path:
    """Fig. 1 of the paper: training error (left) and test error (right) of a shallow and a
    deep plain net."""
    plt = _pyplot()
    runs = data["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, split in zip(axes, ("train", "test")):
        for name, color in ((shallow, "tab:orange"), (deep, "tab:red")):
            if name in runs and runs[name][split]:
                s, e = zip(*runs[name][split])
                ax.plot(
                    s,
                    [100 * v for v in e],
                    color=color,
                    lw=1.0 if split == "train" else 2.0,
                    label=f"{runs[name]['depth']}-layer",
                )
        ax.set_title(f"{'training' if split == 'train' else 'test'} error (%)")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def layer_responses(data: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Fig. 7 of the paper: std of each 3x3 layer's response, in layer order (top) and
    sorted by magnitude (bottom)."""
    plt = _pyplot()
    nets = data["nets"]
    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    styles = {"plain": "--", "resnet": "-"}
    cmap = plt.get_cmap("tab10")
    for i, (name, net) in enumerate(nets.items()):
        stds = [layer["std"] for layer in net["layers"]]
        kw = dict(color=cmap(i % 10), ls=styles.get(net["family"], ":"), lw=1.2, label=name)
        axes[0].plot(range(1, len(stds) + 1), stds, **kw)
        axes[1].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), **kw)
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def gradient_flow(data: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Norm of dL/dx at the input of every block, relative to its value at the last block,
    against the block's position (0 = first block, 1 = last), log scale."""
    plt = _pyplot()
    nets = data["nets"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"plain": "--", "resnet": "-", "resnet_zero_init": ":"}
    depths = sorted({net["depth"] for net in nets.values()})
    colors = _depth_colors(depths)
    for name, net in nets.items():
        norms = [b["grad_norm"] for b in net["blocks"]]
        last = norms[-1] if norms[-1] > 0 else 1.0
        n = len(norms)
        xs = [i / max(1, n - 1) for i in range(n)]
        ax.plot(
            xs,
            [v / last for v in norms],
            ls=styles.get(net["variant"], "-."),
            color=colors[net["depth"]],
            lw=1.3,
            label=name,
        )
    ax.set_yscale("log")
    ax.set_xlabel("block position (0: first block, 1: last block)")
    ax.set_ylabel("||dL/dx|| at block input / at last block")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def seed_curves(data: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Error (%) against iterations, one colour per seed: thin lines training error, bold
    lines the evaluation error whose last point is the seed's reported figure (a dot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, run in enumerate(sorted(data["runs"].values(), key=lambda r: r["seed"])):
        c = cmap(i % 10)
        if run["train"]:
            s, e = zip(*run["train"])
            ax.plot(s, [100 * v for v in e], color=c, lw=0.8, alpha=0.7)
        if run["test"]:
            s, e = zip(*run["test"])
            final = f"final {100 * run['final_error']:.2f}%" if run["finished"] else "unfinished"
            ax.plot(s, [100 * v for v in e], color=c, lw=2.0, label=f"seed {run['seed']} ({final})")
            if run["finished"]:
                ax.plot([s[-1]], [100 * e[-1]], "o", color=c, ms=5)
    paper = data.get("paper")
    summary = data["summary"]
    if paper and paper.get("mean") is not None and summary["n"]:
        finished = [r for r in data["runs"].values() if r["finished"]]
        full = {r["steps"] * (r["batch_size"] or 0) for r in finished} == {
            paper["steps"] * paper["batch_size"]
        }
        if full:  # only beside runs of the paper's length: otherwise it says nothing
            ax.axhspan(paper["mean"] - paper["std"], paper["mean"] + paper["std"], color="grey", alpha=0.25)
            ax.axhline(
                paper["mean"], color="grey", ls="--", lw=1, label=f"paper mean ± std ({paper['source']})"
            )
    split = data.get("eval_split", "test")
    ax.set_xlabel("iterations")
    ax.set_ylabel(f"error (%)  (thin: training, bold: {split})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
