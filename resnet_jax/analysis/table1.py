"""Table 1 of the 2015 paper: FLOPs (multiply-adds) and parameters of the ImageNet nets,
from :func:`resnet_jax.summary.summarize` (shapes only, nothing runs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Table 1's "FLOPs" row, x10^9 multiply-adds at 224x224 (the paper gives no parameter counts).
PAPER_FLOPS = {
    "resnet18": 1.8,
    "resnet34": 3.6,
    "resnet50": 3.8,
    "resnet101": 7.6,
    "resnet152": 11.3,
    # Section 3.3 / Fig. 3: the 34-layer plain net has 3.6 billion FLOPs.
    "plain34": 3.6,
}
IMAGENET_NETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "plain18",
    "plain34",
    "preact_resnet200",
)


def table1(names: Sequence[str] = IMAGENET_NETS) -> dict[str, Any]:
    from resnet_jax import models
    from resnet_jax.summary import summarize

    rows = {}
    for name in names:
        s = summarize(models.build_model(name))
        rows[name] = {
            "params": s["params"],
            "flops": s["flops"],
            "image_size": s["image_size"],
            "stages": {k: v["shape"] for k, v in s["stages"].items()},
            "paper_flops_1e9": PAPER_FLOPS.get(name),
        }
    return {"nets": rows}


def markdown_table(data: Mapping[str, Any]) -> str:
    lines = ["| net | params | FLOPs here (x10^9) | FLOPs paper (x10^9) |", "| --- | ---: | ---: | ---: |"]
    for name, row in data["nets"].items():
        paper = row["paper_flops_1e9"]
        lines.append(
            f"| {name} | {row['params']:,} | {row['flops'] / 1e9:.2f} | {'-' if paper is None else paper} |"
        )
    return "\n".join(lines) + "\n"
