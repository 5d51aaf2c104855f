"""``python -m resnet_jax.export SRC OUT``: see the package docstring (``--help``).

Exit status: 0 written; 2 SRC or OUT does not fit (one ``error:`` line naming what and why,
before anything is compiled); 75 a model name's download failed.
"""

from __future__ import annotations

import argparse
import sys

from resnet_jax import export as export_lib
from resnet_jax.errors import ResNetJaxError, first_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.export",
        description=export_lib.__doc__.split("\n\n")[0],
        epilog="\n\n".join(export_lib.__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", help="training workdir, converted directory, .pth/.safetensors file or model name"
    )
    parser.add_argument("out", help=f"the file to write, ending in {' or '.join(export_lib.FORMATS)}")
    parser.add_argument(
        "--arch", default=None, help="architecture of a weight file (default: from its keys), e.g. resnet50"
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a run's exponential moving average of the weights (default: when the checkpoint has one)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="input height and width (default: the trained size)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--platforms",
        default=None,
        help="comma-separated platforms of a .stablehlo artifact (default: cpu,cuda,tpu)",
    )
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size {args.image_size}: want a positive integer")
    platforms = None if args.platforms is None else tuple(p.strip() for p in args.platforms.split(","))
    try:
        side = export_lib.export_model(
            args.src,
            args.out,
            arch=args.arch,
            ema=args.ema,
            image_size=args.image_size,
            dtype=args.dtype,
            platforms=platforms,
        )
    except ResNetJaxError as e:
        print(f"error: {first_line(e, 1000)}", file=sys.stderr)
        return e.exit_status
    if side["normalization"] is None:
        print(
            f"warning: {args.src} records no input normalisation (a CIFAR run trained before runs "
            "recorded it); its per-pixel mean is not in the side JSON",
            file=sys.stderr,
        )
    print(
        f"{args.src} ({side['model']}, {side['num_classes']} classes, {side['weights']} weights) -> "
        f"{args.out} ({side['bytes']:,} bytes) and {args.out}{export_lib.SIDE_SUFFIX}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
