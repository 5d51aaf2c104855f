r"""Command line for the papers' analyses; each writes a PNG, the JSON it was drawn from,
and (where the paper has a table) a markdown table, into ``--out``.

  python -m resnet_jax.experiments degradation --workdir runs/degradation --out docs/figures
  python -m resnet_jax.experiments layer-responses --workdirs runs/degradation --out docs/figures
  python -m resnet_jax.experiments gradient-flow --depths 20 32 44 56 110 --out docs/figures
  python -m resnet_jax.experiments table1 --out docs/figures
  python -m resnet_jax.experiments seeds --config configs/cifar10.py:resnet110 --seeds 5 --workdir runs/r110

``degradation`` trains the paper's CIFAR recipe (configs/cifar10.py) for plain and residual
nets of every depth given, one workdir per net; rerunning continues a killed sweep (finished
nets are skipped, a half-trained one resumes). ``--steps N`` compresses the recipe to N steps
for small machines. ``seeds`` trains one config under N seeds the same resumable way (a
workdir per seed) and reports best (mean ± std) of each seed's final test error. Both take
``--set FIELD=VALUE`` or ``--config.FIELD=VALUE`` for any other config field.
``python -m resnet_jax.experiments COMMAND --help`` lists the options.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The recipe ships with the package, so a non-editable install finds it too.
_PACKAGED_CONFIG = Path(__file__).resolve().parent / "configs" / "cifar10.py"


def load_config_file(path: str | Path, arg: str):
    """``get_config(arg)`` of a config file, as ``--config path:arg`` of resnet_jax.main reads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--config {path}: no such config file (the CIFAR recipe is configs/cifar10.py "
            f"in the repository, {_PACKAGED_CONFIG} in the installed package)"
        )
    from resnet_jax.errors import ResNetJaxError, UserError

    spec = importlib.util.spec_from_file_location(f"_experiment_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  whatever the user's file raises, its message says it
        raise UserError(f"--config {path}: the config file does not load: {type(e).__name__}: {e}") from None
    try:
        return module.get_config(arg)
    except ResNetJaxError:
        raise
    except Exception as e:  # noqa: BLE001  the user's file again (a bad ARG: int('abc'), a stray option)
        raise UserError(
            f"--config {path}:{arg}: get_config({arg!r}) failed: {type(e).__name__}: {e}"
        ) from None


def _set_field(config: Any, dotted: str, text: str, flag: str = "--set ") -> None:
    """``--set a.b=text`` (or ``--config.a.b=text``, ``flag`` says which): a misspelt field or a
    value of the wrong type is a ConfigError naming it."""
    import difflib

    from resnet_jax.summary import parse_value
    from resnet_jax.train.config import ConfigError

    node = config
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        fields = list(node.keys()) if hasattr(node, "keys") else []
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(
                f"{flag}{dotted}={text}: no such config field {'.'.join(keys[: i + 1])!r}"
                + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if i < len(keys) - 1:
            node = node[key]
    try:
        node[keys[-1]] = parse_value(text)
    except (TypeError, ValueError) as e:  # ml_collections keeps a field's type
        raise ConfigError(f"{flag}{dotted}={text}: {e}") from None


def _check_nets(flag: str, nets: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Every (model name, overrides) a command will build: a bad one is a UsageError naming
    ``flag``, before any data is read (models raise plain ValueErrors, as a library does)."""
    from resnet_jax import models
    from resnet_jax.errors import UsageError

    for name, overrides in nets:
        try:
            models.build_model(name, **{**overrides, "conv_impl": "xla"})  # no backend query
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None


def _write_json(path: Path, obj: Any) -> None:
    from resnet_jax.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def _save_results(
    args: argparse.Namespace, name: str, data: dict, markdown_table: Any, plot: Any = None, title: str = ""
) -> str:
    """Writes `name`.json (data), `name`.md (`markdown_table(data)`) and, given `plot`,
    `name`.png under --out; returns the table, for the command to print."""
    out = Path(args.out)
    table = markdown_table(data)
    _write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(table)
    if plot is not None:
        plot(data, out / f"{name}.png", title=title)
    return table


def _recipe_config(args: argparse.Namespace, config_file: str | Path, config_arg: str | None, seed: int):
    """One net's config as the sweeps' options say: the config file's ``get_config(arg)``,
    compressed to ``--steps`` or at the full schedule with denser curves, the data options,
    the seed, then ``--set`` and ``--config.`` overrides (misspelt ones are ConfigErrors)."""
    from resnet_jax.analysis import degradation as deg

    config = load_config_file(config_file, config_arg)
    batch = args.batch or config.batch_size
    if args.steps:
        deg.Shortening(args.steps, batch, args.eval_every, args.log_every).apply(config)
    else:
        if batch != config.batch_size:  # the recipe's own rescaling of steps and lr
            config = load_config_file(config_file, f"{config_arg},batch={batch}")
        deg.full_schedule_cadence(config)
        if args.eval_every or args.log_every:
            deg.set_cadence(
                config,
                args.log_every or config.log_every_steps,
                args.eval_every or config.eval_every_steps,
                args.eval_every or config.checkpoint_every_steps,
            )
    config.seed = seed
    config.tensorboard = False
    config.dataset.train_subset = args.train_subset
    config.dataset.eval_subset = args.eval_subset
    if args.data_dir:
        config.dataset.data_dir = args.data_dir
        config.dataset.source = "binary"
    for item in args.set:
        field, _, value = item.partition("=")
        _set_field(config, field, value)
    for item in args.config_overrides:
        field, _, value = item.partition("=")
        _set_field(config, field, value, flag="--config.")
    return config


def _degradation(args: argparse.Namespace) -> int:
    from resnet_jax.analysis import degradation as deg
    from resnet_jax.analysis import plots

    names = deg.net_names(args.depths, args.families)

    def make_config(name: str):
        return _recipe_config(args, args.config, name, args.seed)

    if not args.plot_only:
        for name in names:  # every --config/--set mistake before the first net trains
            make_config(name)
        trained = deg.run_sweep(names, args.workdir, make_config)
        logging.info("trained %s", trained or "nothing (every net was done)")
    data = deg.collect(names, args.workdir)
    data["command"] = (
        " ".join(["python -m resnet_jax.experiments"] + sys.argv[1:]) if args.record_command else None
    )
    table = _save_results(args, "degradation", data, deg.markdown_table)
    out = Path(args.out)
    title = (
        f"CIFAR-10, {args.steps} steps of batch {args.batch}" if args.steps else "CIFAR-10, paper schedule"
    )
    if args.train_subset:
        title += f", {args.train_subset} training images"
    plots.degradation(data, out / "degradation.png", families=args.families, title=title)
    if "plain20" in data["runs"] and "plain56" in data["runs"]:
        plots.degradation_fig1(data, out / "degradation_fig1.png", title=title)
    print(table)
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from resnet_jax.analysis import degradation as deg
    from resnet_jax.analysis import plots
    from resnet_jax.analysis import seeds as seeds_lib
    from resnet_jax.train.config import ConfigError

    config_file, colon, config_arg = args.config.rpartition(":")
    if not colon or not config_file or not config_arg:
        raise ConfigError(
            f"--config {args.config}: give the config file and its argument as PATH:ARG, "
            "e.g. configs/cifar10.py:resnet110"
        )
    for flag, items in (("--set ", args.set), ("--config.", args.config_overrides)):
        if any(item.partition("=")[0] == "seed" for item in items):
            raise ConfigError(f"{flag}seed: the seed of each run is set by --seeds and --first-seed")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    names = seeds_lib.seed_names(seeds)

    def make_config(name: str):
        return _recipe_config(args, config_file, config_arg, int(name.removeprefix("seed")))

    first = make_config(names[0])  # every --config/--set mistake before the first seed trains
    if not args.plot_only:
        trained = deg.run_sweep(names, args.workdir, make_config)
        logging.info("trained %s", trained or "nothing (every seed was done)")
    data = seeds_lib.collect(args.workdir, seeds, first.to_dict())
    data["config"] = args.config
    data["command"] = (
        " ".join(["python -m resnet_jax.experiments"] + sys.argv[1:]) if args.record_command else None
    )
    steps = f"{args.steps} steps" if args.steps else "paper schedule"
    title = (
        f"{data['model']} on {data['dataset']}, {steps}, {len(seeds)} seeds; final {data['eval_split']} "
        f"error best (mean ± std): {seeds_lib.best_mean_std(data['summary'])} %"
    )
    print(_save_results(args, "seeds", data, seeds_lib.markdown_table, plots.seed_curves, title))
    return 0


def _trained_nets(workdirs: Sequence[str]) -> list[Path]:
    """Training workdirs given directly, or found one level below a sweep's root."""
    found = []
    for w in workdirs:
        w = Path(w)
        if (w / "config.json").is_file():
            found.append(w)
        else:
            found.extend(sorted(p.parent for p in w.glob("*/config.json")))
    if not found:
        raise FileNotFoundError(f"no training workdir (a folder with config.json) in {list(workdirs)}")
    return found


def _net_label(config: dict) -> tuple[str, str, int]:
    """('ResNet-20', 'resnet', 20) from a workdir's config."""
    import re

    name = config["model"]["name"]
    m = re.fullmatch(r"cifar_(plain|resnet)(\d+)", name)
    if not m:
        return name, "other", 0
    family, depth = m.group(1), int(m.group(2))
    zero = config["model"].get("zero_init_last")
    return (
        f"{'plain' if family == 'plain' else 'ResNet'}-{depth}" + (" zero-init" if zero else ""),
        family,
        depth,
    )


def _layer_responses(args: argparse.Namespace) -> int:
    from resnet_jax import models
    from resnet_jax.analysis import plots, probes, responses

    _check_nets("--init", [(name, {}) for name in args.init])
    images, _ = probes.cifar_batch(args.data_dir, "test", args.images)
    nets = {}
    sources = []
    for w in _trained_nets(args.workdirs) if args.workdirs else []:
        config, model, variables, step = probes.load_workdir(w)
        label, family, depth = _net_label(config)
        sources.append((f"{label} (step {step})", family, depth, model, variables, step, w.name))
    for name in args.init:
        model = models.build_model(name)
        label = name.replace("cifar_", "")
        sources.append(
            (
                f"{label} (init)",
                "plain" if "plain" in name else "resnet",
                0,
                model,
                probes.init_variables(model, args.seed),
                0,
                None,
            )
        )
    for label, family, depth, model, variables, step, workdir in sources:
        layers = responses.layer_responses(model, variables, images, batch_size=args.batch)
        nets[label] = {"family": family, "depth": depth, "step": step, "workdir": workdir, "layers": layers}
        logging.info(
            "%s: %d layers, mean std %.3f", label, len(layers), responses.summary_row(layers)["mean_std"]
        )
    data = {"nets": nets, "images": args.images, "split": "test", "mode": "eval (BN running statistics)"}
    title = f"std of 3x3 layer responses on {args.images} CIFAR-10 test images"
    print(
        _save_results(args, "layer_responses", data, responses.markdown_table, plots.layer_responses, title)
    )
    return 0


def _gradient_flow(args: argparse.Namespace) -> int:
    from resnet_jax.analysis import gradient_flow as gf
    from resnet_jax.analysis import plots, probes

    _check_nets("--depths", [gf.model_name(v, d) for d in args.depths for v in args.variants])
    images, labels = probes.cifar_batch(args.data_dir, "train", args.images)
    data = gf.sweep_at_init(args.depths, args.variants, images, labels, seed=args.seed)
    for w in _trained_nets(args.workdirs) if args.workdirs else []:
        config, model, variables, step = probes.load_workdir(w)
        label, family, depth = _net_label(config)
        result = gf.gradient_norms(model, variables, images, labels)
        variant = (
            "plain"
            if family == "plain"
            else ("resnet_zero_init" if config["model"].get("zero_init_last") else "resnet")
        )
        data["nets"][f"{label} (step {step})"] = {
            "model": config["model"]["name"],
            "depth": depth,
            "variant": variant,
            "checkpoint": w.name,
            **result,
        }
    title = f"dL/dx at block inputs, batch of {args.images} CIFAR-10 training images, BN in training mode"
    print(_save_results(args, "gradient_flow", data, gf.markdown_table, plots.gradient_flow, title))
    return 0


def _table1(args: argparse.Namespace) -> int:
    from resnet_jax.analysis import table1

    _check_nets("--nets", [(name, {}) for name in args.nets])
    data = table1.table1(args.nets)
    print(_save_results(args, "table1", data, table1.markdown_table))
    return 0


def _count(text: str) -> int:
    """``--seeds``: a whole number >= 1 (argparse's error names the option)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seeds (an integer >= 1; 2 or more for a std)"
        )
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one ``error:`` line and status 2, as every mistake of the command lines."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the options)\n")


def _sweep_options(d: argparse.ArgumentParser, batch_default: int | None) -> None:
    """The options the degradation and seeds sweeps share (_recipe_config reads them)."""
    d.add_argument(
        "--steps",
        type=int,
        default=None,
        help="compress the paper's 64k-step schedule to this many steps (small machines)",
    )
    d.add_argument(
        "--batch",
        type=int,
        default=batch_default,
        help="batch size (lr by the linear scaling rule)"
        + ("" if batch_default else "; default: the config's"),
    )
    d.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations")
    d.add_argument("--log-every", type=int, default=None, help="steps between training-error records")
    d.add_argument("--train-subset", type=int, default=0, help="train on the first k images only (0: all)")
    d.add_argument("--eval-subset", type=int, default=0, help="evaluate on the first k test images (0: all)")
    d.add_argument("--data-dir", default=None, help="CIFAR-10 binary files (else $CIFAR10_DIR or tfds)")
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other config field, e.g. --set model.dtype=bfloat16 (or --config.model.dtype=bfloat16)",
    )
    d.add_argument("--plot-only", action="store_true", help="redraw from the workdirs without training")
    d.add_argument("--no-record-command", dest="record_command", action="store_false", help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m resnet_jax.experiments",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("degradation", help="train plain and residual CIFAR nets; Fig. 1, Fig. 6, Table 6")
    d.add_argument("--depths", type=int, nargs="+", default=[20, 32, 44, 56])
    d.add_argument("--families", nargs="+", default=["plain", "resnet"], choices=["plain", "resnet"])
    d.add_argument("--workdir", default="runs/degradation", help="one workdir per net under this folder")
    d.add_argument("--out", default=None, help="where the PNG, JSON and markdown go (default: --workdir)")
    d.add_argument(
        "--config",
        default=str(_PACKAGED_CONFIG),
        help="the CIFAR config file (get_config(name)); default: the package's CIFAR-10 recipe",
    )
    _sweep_options(d, batch_default=128)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_degradation)

    n = sub.add_parser(
        "seeds",
        help="one config under N seeds: best (mean ± std) of the final test error, per-seed curves",
        description="Trains one config under seeds first-seed .. first-seed+N-1 (a workdir per seed, "
        "resumable) and reports best (mean ± std, sample std) of each seed's FINAL test error beside "
        "the paper's figure, with per-seed curves. No step is selected on the test set.",
    )
    n.add_argument(
        "--config",
        required=True,
        metavar="PATH:ARG",
        help="config file and its argument, as resnet_jax.main takes it: configs/cifar10.py:resnet110",
    )
    n.add_argument("--seeds", type=_count, required=True, metavar="N", help="how many seeds (>= 2 for a std)")
    n.add_argument(
        "--first-seed", type=_nonnegative, default=0, help="seeds are first-seed .. first-seed+N-1"
    )
    n.add_argument(
        "--workdir", required=True, help="one workdir per seed (seed0, seed1, ...) under this folder"
    )
    n.add_argument(
        "--out", default=None, help="where seeds.md, seeds.json and seeds.png go (default: --workdir)"
    )
    _sweep_options(n, batch_default=None)
    n.set_defaults(func=_seeds)

    r = sub.add_parser("layer-responses", help="std of every 3x3 layer response (Fig. 7)")
    r.add_argument(
        "--workdirs",
        nargs="*",
        default=[],
        help="training workdirs, or a sweep root holding them (newest checkpoint of each)",
    )
    r.add_argument("--init", nargs="*", default=[], help="also these model names at initialisation")
    r.add_argument("--images", type=int, default=10_000, help="how many test images")
    r.add_argument("--batch", type=int, default=500)
    r.add_argument("--data-dir", default=None, help="CIFAR-10 binary files (else $CIFAR10_DIR or tfds)")
    r.add_argument("--seed", type=int, default=0, help="initialisation seed for --init")
    r.add_argument("--out", default="runs/analysis")
    r.set_defaults(func=_layer_responses)

    g = sub.add_parser("gradient-flow", help="dL/dx at every block input, plain vs residual")
    g.add_argument("--depths", type=int, nargs="*", default=[20, 32, 44, 56, 110])
    g.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "resnet", "resnet_zero_init"],
        choices=["plain", "resnet", "resnet_zero_init"],
    )
    g.add_argument("--workdirs", nargs="*", default=[], help="also trained nets (workdirs or a sweep root)")
    g.add_argument("--images", type=int, default=128, help="batch of training images for the loss")
    g.add_argument("--data-dir", default=None, help="CIFAR-10 binary files (else $CIFAR10_DIR or tfds)")
    g.add_argument("--seed", type=int, default=0, help="initialisation seed (the trainer's)")
    g.add_argument("--out", default="runs/analysis")
    g.set_defaults(func=_gradient_flow)

    t = sub.add_parser("table1", help="FLOPs and parameters of the ImageNet nets beside the paper's Table 1")
    t.add_argument("--nets", nargs="+", default=None, help="model names (default: every ImageNet net)")
    t.add_argument("--out", default="runs/analysis")
    t.set_defaults(func=_table1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.FIELD=VALUE, as python -m resnet_jax.main takes overrides (argparse cannot
    # declare a family of options): taken out here, applied like --set.
    overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    parser = _parser()
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.config_overrides = overrides
    for item in overrides:
        if "=" not in item:
            parser.error(f"--config.{item}: an override is --config.FIELD=VALUE")
    if overrides and not hasattr(args, "set"):
        parser.error(f"{args.command} takes no config overrides (--config.{overrides[0]})")
    if args.command in ("degradation", "seeds") and args.out is None:
        args.out = args.workdir
    if args.command == "table1" and args.nets is None:
        from resnet_jax.analysis.table1 import IMAGENET_NETS

        args.nets = list(IMAGENET_NETS)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Exception as e:  # mapped by family (resnet_jax.errors); a bug goes on
        from resnet_jax import errors

        status = errors.exit_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
