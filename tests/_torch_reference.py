"""Independent float64 torch references of every block and of whole networks, for tests.

Written from the papers, not from resnet_jax: He et al. 2015 (post-activation blocks,
Fig. 2 and Fig. 5; plain nets; shortcut options A/B/C, Sec. 3.3 and 4.1; the ImageNet
stem of Table 1; the CIFAR layout of Sec. 4.2) and He et al. 2016 (full pre-activation,
Fig. 4e; the stand-alone conv1 whose activation the first unit takes "before splitting
into two paths"; an extra activation after the last unit). Convolutions and batch norm
are torch's own (`F.conv2d`, `F.batch_norm`), in NCHW.

Choices the papers leave open follow what resnet_jax documents, so that a difference
here means a bug, not a convention: option A appends its zero channels after the
existing ones; a pre-activation projection reads the pre-activated input and has no BN;
parameter-free shortcuts of pre-activation blocks carry the raw input; the ImageNet
max-pool pads by 1. The only thing shared with the code under test is the *names* of the
parameters (conv1, bn1, proj_conv, ...), used to copy a flax variables dict in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

BN_MOMENTUM = 0.1  # torch's convention: weight of the new batch statistics
BN_EPS = 1e-5


def nchw(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2).contiguous()


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.numpy()


class Reference:
    """Reads parameters from a flax variables dict; records BN statistics updated torch's way."""

    def __init__(self, variables: Mapping[str, Any], train: bool):
        self.params = variables["params"]
        self.stats = variables.get("batch_stats", {})
        self.train = train
        self.updated: dict[tuple[str, ...], dict[str, Any]] = {}  # path -> new mean/var, n
        self.used: set[tuple[str, ...]] = set()  # layers whose parameters were read

    def _leaf(self, tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
        if tree is self.params:
            self.used.add(path)
        for name in path:
            tree = tree[name]
        return tree

    def _t(self, x: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(x, np.float64))

    def conv(self, x: torch.Tensor, path: tuple[str, ...], stride: int, pad: int) -> torch.Tensor:
        kernel = self._t(self._leaf(self.params, path)["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
        return F.conv2d(x, kernel, stride=stride, padding=pad)

    def bn(self, x: torch.Tensor, path: tuple[str, ...]) -> torch.Tensor:
        p, s = self._leaf(self.params, path), self._leaf(self.stats, path)
        mean, var = self._t(s["mean"]), self._t(s["var"])  # updated in place when training
        y = F.batch_norm(
            x,
            mean,
            var,
            self._t(p["scale"]),
            self._t(p["bias"]),
            training=self.train,
            momentum=BN_MOMENTUM,
            eps=BN_EPS,
        )
        if self.train:
            self.updated[path] = {"mean": mean.numpy(), "var": var.numpy(), "n": x.numel() // x.shape[1]}
        return y

    def dense(self, x: torch.Tensor, path: tuple[str, ...]) -> torch.Tensor:
        p = self._leaf(self.params, path)
        return F.linear(x, self._t(p["kernel"]).T, self._t(p["bias"]))


# --------------------------------------------------------------------------- shortcuts
def option_a(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """2015 Sec. 3.3 (A): identity, subsampled, with extra zero channels (appended)."""
    x = x[:, :, ::stride, ::stride]
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


def projects(cin: int, cout: int, stride: int, shortcut: str) -> bool:
    """B: projection only where the shape changes; C: everywhere; A: never."""
    return shortcut == "C" or (shortcut == "B" and (stride != 1 or cin != cout))


# --------------------------------------------------------------------------- 2015 blocks
def basic(r: Reference, x, path, filters, stride, shortcut, **_):
    y = F.relu(r.bn(r.conv(x, path + ("conv1",), stride, 1), path + ("bn1",)))
    y = r.bn(r.conv(y, path + ("conv2",), 1, 1), path + ("bn2",))
    if projects(x.shape[1], filters, stride, shortcut):
        sc = r.bn(r.conv(x, path + ("proj_conv",), stride, 0), path + ("proj_bn",))
    else:
        sc = option_a(x, filters, stride)
    return F.relu(y + sc)


def bottleneck(r: Reference, x, path, filters, stride, shortcut, stride_on_3x3=False, **_):
    s1, s3 = (1, stride) if stride_on_3x3 else (stride, 1)
    y = F.relu(r.bn(r.conv(x, path + ("conv1",), s1, 0), path + ("bn1",)))
    y = F.relu(r.bn(r.conv(y, path + ("conv2",), s3, 1), path + ("bn2",)))
    y = r.bn(r.conv(y, path + ("conv3",), 1, 0), path + ("bn3",))
    out = 4 * filters
    if projects(x.shape[1], out, stride, shortcut):
        sc = r.bn(r.conv(x, path + ("proj_conv",), stride, 0), path + ("proj_bn",))
    else:
        sc = option_a(x, out, stride)
    return F.relu(y + sc)


def plain_basic(r: Reference, x, path, filters, stride, **_):
    y = F.relu(r.bn(r.conv(x, path + ("conv1",), stride, 1), path + ("bn1",)))
    return F.relu(r.bn(r.conv(y, path + ("conv2",), 1, 1), path + ("bn2",)))


def plain_bottleneck(r: Reference, x, path, filters, stride, stride_on_3x3=False, **_):
    s1, s3 = (1, stride) if stride_on_3x3 else (stride, 1)
    y = F.relu(r.bn(r.conv(x, path + ("conv1",), s1, 0), path + ("bn1",)))
    y = F.relu(r.bn(r.conv(y, path + ("conv2",), s3, 1), path + ("bn2",)))
    return F.relu(r.bn(r.conv(y, path + ("conv3",), 1, 0), path + ("bn3",)))


# --------------------------------------------------------------------------- 2016 blocks
def _preact_input(r: Reference, x, path, activated):
    return x if activated else F.relu(r.bn(x, path + ("bn1",)))


def _preact_shortcut(r: Reference, x, pre, path, out, stride, shortcut):
    if projects(x.shape[1], out, stride, shortcut):
        return r.conv(pre, path + ("proj_conv",), stride, 0)
    return option_a(x, out, stride)


def preact_basic(r: Reference, x, path, filters, stride, shortcut, activated=False, **_):
    pre = _preact_input(r, x, path, activated)
    y = r.conv(pre, path + ("conv1",), stride, 1)
    y = r.conv(F.relu(r.bn(y, path + ("bn2",))), path + ("conv2",), 1, 1)
    return y + _preact_shortcut(r, x, pre, path, filters, stride, shortcut)


def preact_bottleneck(
    r: Reference, x, path, filters, stride, shortcut, stride_on_3x3=False, activated=False, **_
):
    s1, s3 = (1, stride) if stride_on_3x3 else (stride, 1)
    pre = _preact_input(r, x, path, activated)
    y = r.conv(pre, path + ("conv1",), s1, 0)
    y = r.conv(F.relu(r.bn(y, path + ("bn2",))), path + ("conv2",), s3, 1)
    y = r.conv(F.relu(r.bn(y, path + ("bn3",))), path + ("conv3",), 1, 0)
    return y + _preact_shortcut(r, x, pre, path, 4 * filters, stride, shortcut)


BLOCKS = {
    "BasicBlock": (basic, 1, False),
    "Bottleneck": (bottleneck, 4, False),
    "PlainBlock": (plain_basic, 1, False),
    "PlainBottleneck": (plain_bottleneck, 4, False),
    "PreActBasicBlock": (preact_basic, 1, True),
    "PreActBottleneck": (preact_bottleneck, 4, True),
}


# --------------------------------------------------------------------------- networks
def network(
    r: Reference,
    x: torch.Tensor,
    block: str,
    stage_sizes,
    widths,
    stem: str,
    shortcut: str,
    stride_on_3x3: bool = False,
) -> torch.Tensor:
    """Logits of a whole net: stem, stages (stride 2 at the first block of stages 2..),
    (pre-activation: final BN-ReLU), global average pool, fully connected layer."""
    fn, expansion, preact = BLOCKS[block]
    if stem == "imagenet":  # 2015 Table 1: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool
        x = F.relu(r.bn(r.conv(x, ("stem_conv",), 2, 3), ("stem_bn",)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
    else:  # 2015 Sec. 4.2: a 3x3 conv (BN, ReLU); 2016: the first unit's activation
        x = F.relu(r.bn(r.conv(x, ("stem_conv",), 1, 1), ("stem_bn",)))
    for i, (n, width) in enumerate(zip(stage_sizes, widths)):
        for j in range(n):
            x = fn(
                r,
                x,
                (f"stage{i + 1}_block{j + 1}",),
                width,
                2 if i > 0 and j == 0 else 1,
                shortcut=shortcut,
                stride_on_3x3=stride_on_3x3,
                activated=preact and i == j == 0,
            )
    if preact:
        x = F.relu(r.bn(x, ("final_bn",)))
    return r.dense(x.mean(dim=(2, 3)), ("head",))


def flax_running_var_as_torch(old_var, flax_new_var, n, momentum=BN_MOMENTUM):
    """Flax updates the running variance with the biased batch variance, torch with the
    unbiased one: the torch value that corresponds to flax's update."""
    biased = (
        np.asarray(flax_new_var, np.float64) - (1 - momentum) * np.asarray(old_var, np.float64)
    ) / momentum
    return (1 - momentum) * np.asarray(old_var, np.float64) + momentum * biased * n / (n - 1)
