"""Parameters and multiply-adds of the papers' networks counted layer by layer from the papers'
descriptions (2015 Table 1, Sec. 4.2; 2016 Sec. 4), with no resnet_jax code: the independent
count that the code's summaries, Table 1 and the docs' model table are checked against."""

import re

# Depth tables of the papers, written out again here (2015 Table 1; ResNet-200 from 2016).
IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def closed_form(name: str) -> tuple[int, int]:
    """(parameters, multiply-adds at batch 1) counted layer by layer from the papers.

    ImageNet: 224x224, 7x7/2 conv + BN, max-pool, stages at 56/28/14/7, option B, stride
    on the first 1x1 of a bottleneck. CIFAR: 32x32, 3x3 conv + BN, stages at 32/16/8,
    option A (B for the pre-activation bottleneck nets). Pre-activation: BN before each conv
    instead of after (none before the first block, which takes the stem's), no BN on a
    projection, a final BN. Plain: no shortcuts.
    """
    family, depth = re.fullmatch(r"([a-z_]+?)(\d+)", name).groups()
    depth = int(depth)
    preact, plain = "preact" in family, "plain" in family
    if family.startswith("cifar"):
        bottleneck = preact and depth >= 164 and (depth - 2) % 9 == 0
        n = (depth - 2) // (9 if bottleneck else 6)
        kind, sizes, widths, sides = (
            ("bottleneck" if bottleneck else "basic"),
            (n,) * 3,
            (16, 32, 64),
            (32, 16, 8),
        )
        shortcut, classes = ("B" if bottleneck else "A"), 10
        stem_k, stem_side = 3, 32
    else:
        kind, sizes = IMAGENET[depth]
        widths, sides, shortcut, classes, stem_k, stem_side = (
            (64, 128, 256, 512),
            (56, 28, 14, 7),
            "B",
            1000,
            7,
            112,
        )
    params = stem_k * stem_k * 3 * widths[0] + 2 * widths[0]
    flops = stem_side**2 * stem_k * stem_k * 3 * widths[0]
    cin = widths[0]
    for stage, (n, f, side) in enumerate(zip(sizes, widths, sides)):
        for j in range(n):
            stride = 2 if stage and not j else 1
            if kind == "basic":
                convs, cout = [(3, cin, f), (3, f, f)], f
            else:
                convs, cout = [(1, cin, f), (3, f, f), (1, f, 4 * f)], 4 * f
            for k, a, b in convs:
                params += k * k * a * b
                flops += side * side * k * k * a * b  # every conv of a block runs at the output side
            bn_channels = [a for _, a, _ in convs] if preact else [b for _, _, b in convs]
            if preact and stage == 0 and j == 0:
                bn_channels = bn_channels[1:]
            params += sum(2 * c for c in bn_channels)
            if not plain and (stride != 1 or cin != cout) and shortcut == "B":
                params += cin * cout + (0 if preact else 2 * cout)
                flops += side * side * cin * cout
            cin = cout
    params += (2 * cin if preact else 0) + cin * classes + classes
    return params, flops + cin * classes


def imagenet_stage_shapes(name: str) -> dict[str, list[int]]:
    """(H, W, C) after the stem conv and each stage at 224x224, and the head's width (Table 1)."""
    family, depth = re.fullmatch(r"([a-z_]+?)(\d+)", name).groups()
    kind, _ = IMAGENET[int(depth)]
    out = 4 if kind == "bottleneck" else 1
    shapes = {"stem": [112, 112, 64]}
    for i, (side, width) in enumerate(zip((56, 28, 14, 7), (64, 128, 256, 512))):
        shapes[f"stage{i + 1}"] = [side, side, width * out]
    shapes["head"] = [1000]
    return shapes
