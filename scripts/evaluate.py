r"""Evaluate trained or converted weights with any of the paper's test protocols.

  python scripts/evaluate.py --config configs/imagenet.py:resnet50 --workdir runs/in_resnet50 \
      --protocol ten_crop --config.dataset.data_dir=~/tensorflow_datasets
  python scripts/evaluate.py --config configs/imagenet.py:resnet50 --checkpoint converted/resnet50 \
      --config.model.stride_on_3x3=True --config.dataset.name=image_folder --config.dataset.data_dir=/data/in

`--workdir`: a training run's workdir (its newest verified checkpoint); `--checkpoint`: a
directory written by `python -m resnet_jax.convert`, a checkpoints/ directory, or a
torchvision/timm `.pth`/`.safetensors` file. The weights must fit the config's model
exactly (same classes). Protocols (ImageNet): 'center' (shorter side 256, centre 224),
'ten_crop' (Tables 2-3), 'multi_scale' (Table 4); CIFAR configs evaluate the test set.
Prints top-1/top-5 error as JSON and writes it to --output (default: the workdir's
eval_<protocol>.json, or only stdout for --checkpoint). `--recalibrate-bn N` adds
'bn_recalibrated': the errors with every BN layer's statistics recomputed over N training
images ("precise BN", resnet_jax/train/recalibrate.py), next to those with the stored ones.
CIFAR weights are fed through the normalisation stored with them (a workdir's
checkpoints/normalization.json, a converted directory's pretrained.json), so only the test
file is read; weights without one get the statistics of the config's training images.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from resnet_jax import errors, models, parallel
from resnet_jax.console import configure_logging, parse_flags
from resnet_jax.data import DataError, normalization
from resnet_jax.files import atomic_write_json
from resnet_jax.interop import weights
from resnet_jax.train import config as config_lib
from resnet_jax.train import recalibrate, sources, steps
from resnet_jax.train.plan import make_plan
from resnet_jax.train.state import TrainState

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/imagenet.py:resnet50.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint dir, checkpoints/ dir, or .pth file."
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    None,
    ["center", "ten_crop", "multi_scale"],
    "ImageNet test protocol (default: the config's dataset.eval_protocol).",
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON result.")
_EMA = flags.DEFINE_bool(
    "ema",
    False,
    "Evaluate the exponential moving average of the weights that a run with ema.decay keeps "
    "(an error when the checkpoint has none); default: the raw weights.",
)
_RECALIBRATE_BN = flags.DEFINE_integer(
    "recalibrate-bn",
    0,
    "N > 0: also report the error with BN statistics recomputed over N training images (the "
    "authors' 'precise BN'; a multiple of the config's batch_size), next to the stored ones'.",
    lower_bound=0,
)
flags.mark_flags_as_required(["config"])
log = logging.getLogger("resnet_jax.evaluate")


def _check_fits(variables: dict, model: models.ResNet, image_shape: tuple[int, int, int], where: str) -> None:
    """The weights must have exactly the model's variables; names the first that differs."""
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False)
    )
    want = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(
            {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
        )
    }
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise config_lib.ConfigError(
                f"{where} does not fit config model {model_name()!r}: variable {key} is "
                f"{got.get(key, 'missing')} in the weights, {want.get(key, 'absent')} in the model "
                "(a different model, model.num_classes or dataset?)"
            )


def model_name() -> str:
    return _CONFIG.value.model.name


def evaluate(config, path: str, ema: bool = False, recalibrate_bn: int = 0) -> dict:
    mesh = parallel.make_mesh()
    # The training data need not be there, unless BN statistics are recomputed on it.
    plan = make_plan(config, mesh.devices.size, train=bool(recalibrate_bn))
    info, model = plan.info, plan.model
    if recalibrate_bn:
        config_lib.check_recalibration(recalibrate_bn, plan.bn_piece, info.num_train, what="--recalibrate-bn")
    try:
        variables, meta = weights.load_variables(path, ema=ema)
    except weights.ConversionError as e:
        raise config_lib.ConfigError(str(e)) from None
    # CIFAR's per-pixel mean comes from the training images: the record stored with the weights
    # spares reading them (and gives what the weights were trained with, whatever the files).
    stored = (meta or {}).get("normalization")
    recompute = config.dataset.name in config_lib.CIFAR_DATASETS and stored is None
    if recompute:
        log.warning(
            "%s records no input normalisation (no checkpoints/%s: a run from before it was stored); "
            "computing it from the config's training images",
            path,
            normalization.FILE,
        )
    _check_fits(variables, model, info.image_shape, path)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=(),
        apply_fn=model.apply,
        tx=None,
    )
    try:
        source = sources.build(
            config, mesh, info, steps.train_step, steps.eval_step, stored_normalization=stored,
            eval_only=not recalibrate_bn,
        )  # fmt: skip
    except DataError as e:
        if not recompute:
            raise
        raise DataError(
            f"{path} records no input normalisation (no checkpoints/{normalization.FILE}), so the "
            f"training images are needed to compute it: {e}"
        ) from None
    start = time.perf_counter()
    record = _evaluate(source, state)
    recalibrated = None
    if recalibrate_bn:
        piece = plan.bn_piece
        pieces = source.recalibration_pieces(recalibrate_bn, piece)
        stats = recalibrate.recalibrated_batch_stats(model, state.variables, pieces)
        again = _evaluate(source, state.replace(batch_stats=stats))
        recalibrated = {
            "num_images": recalibrate_bn,
            "piece_size": piece,
            "top1_error": again["error"],
            "top5_error": again["error_top5"],
            "loss": again["loss"],
        }
    protocol = config.dataset.get("eval_protocol", "test")
    return {
        "model": config.model.name,
        "weights": str(path),
        "ema": ema,
        "dataset": config.dataset.name,
        "split": info.eval_split,
        "protocol": protocol,
        "top1_error": record["error"],
        "top5_error": record["error_top5"],
        "loss": record["loss"],
        "count": record["count"],
        "seconds": time.perf_counter() - start,
    } | ({"bn_recalibrated": recalibrated} if recalibrated else {})


def _evaluate(source, state: TrainState) -> dict[str, float]:
    if not isinstance(source, sources.ImageNetSource):
        return steps.summarize_eval(source.evaluate(state))
    total = None
    eval_fn = jax.jit(steps.eval_step)
    for batch in tqdm(
        source.eval_batches(), desc="evaluating", unit="batch", disable=not parallel.is_main_process()
    ):
        out = eval_fn(state, batch)
        total = out if total is None else jax.tree.map(jax.numpy.add, total, out)
    return steps.summarize_eval(jax.device_get(total))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    configure_logging(detailed=flags.FLAGS["verbosity"].present)
    config = _CONFIG.value
    if _PROTOCOL.value:
        if "eval_protocol" not in config.dataset:
            raise app.UsageError("--protocol is for ImageNet configs; CIFAR evaluates its test set")
        config.dataset.eval_protocol = _PROTOCOL.value
    path = _WORKDIR.value or _CHECKPOINT.value
    try:
        result = evaluate(config, path, ema=_EMA.value, recalibrate_bn=_RECALIBRATE_BN.value)
    except Exception as e:  # mapped by family (resnet_jax.errors); a bug goes on
        status = errors.exit_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        errors.silence_abandoned_work()
        sys.exit(status)
    print(json.dumps(result, indent=1))
    output = _OUTPUT.value or (f"{_WORKDIR.value}/eval_{result['protocol']}.json" if _WORKDIR.value else None)
    if output and parallel.is_main_process():
        atomic_write_json(output, result)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
