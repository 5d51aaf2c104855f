r"""Convert ResNet weights between torchvision/timm files and this project's checkpoints.

  python -m resnet_jax.convert resnet50.pth runs/resnet50_tv      # .pth -> converted checkpoint
  python -m resnet_jax.convert runs/my_run resnet50_mine.pth      # workdir/checkpoint -> .pth
  python -m resnet_jax.convert resnet50:IMAGENET1K_V2 runs/rn50    # torchvision's published weights

The direction follows SRC: a ``.pth``/``.pt``/``.bin``/``.safetensors`` file is converted into
a checkpoint directory DST (orbax, the trainer's layout, with ``pretrained.json`` recording the
model name, overrides and the source file's name and sha256); a converted checkpoint or a
training workdir is exported to the weight file DST, which torchvision/timm load with
``strict=True``: its raw weights, or with ``--ema`` the moving average a run with ``ema.decay``
keeps. ``--arch`` (resnet18/34/50/101/152, or timm:resnet26 ...) is detected from
the file's keys when left out. .pth files are read without torch by a restricted unpickler
(``resnet_jax.interop.pth``) that refuses pickles that carry code; writing a .pth needs torch.
A SRC that is no existing path but a model name (``resnet50``, ``resnet50:IMAGENET1K_V2``,
``timm:resnet50.a1_in1k``) is looked up as ``resnet_jax.interop.hub`` says: torchvision's
published file from the torch hub cache, else downloaded and checked against its hash.
Exit status: 0 done; 2 the input does not fit (the message names the first key/file);
75 the download failed (offline, cut short, wrong hash): rerun later, or fetch the file the
message names by hand.
"""

from __future__ import annotations

import argparse
import sys

from resnet_jax.interop import layout
from resnet_jax.interop.layout import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src",
        help="weight file (.pth/.safetensors), checkpoint dir / workdir, or a name (resnet50:IMAGENET1K_V2)",
    )
    parser.add_argument("dst", help="checkpoint directory to create, or weight file to write")
    parser.add_argument(
        "--arch", default=None, help=f"architecture; default: detected. One of: {', '.join(layout.SUPPORTED)}"
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export the exponential moving average of the weights that a run with ema.decay keeps "
        "(an error when the checkpoint has none); default: the raw weights",
    )
    args = parser.parse_args(argv)
    from resnet_jax.interop import hub
    from resnet_jax.interop import weights as pt

    try:
        src, arch = args.src, args.arch
        if hub.is_model_name(src):
            path, named = hub.fetch(src)
            if arch is not None and layout.canonical_arch(arch) != layout.canonical_arch(named):
                raise ConversionError(f"--arch {arch} contradicts the model name {src}; leave --arch out")
            src, arch = str(path), named
        if pt.is_weight_file(src):
            if pt.is_weight_file(args.dst):
                raise ConversionError(
                    f"DST {args.dst} is a weight file; converting a weight file needs a directory as DST"
                )
            if args.ema:
                raise ConversionError(f"--ema: {args.src} is a weight file, which holds one set of weights")
            model, variables, record = pt.convert_file(src, arch)
            dst = pt.save_converted(args.dst, variables, record)
            print(f"{args.src} ({record['arch']}, {model.num_classes} classes) -> {dst}")
        else:
            if not pt.is_weight_file(args.dst):
                raise ConversionError(
                    f"DST {args.dst} must end in one of {pt.WEIGHT_SUFFIXES} "
                    "when SRC is a checkpoint directory"
                )
            state_dict, arch = pt.export_state_dict(args.src, args.arch, ema=args.ema)
            from resnet_jax.interop.torch_files import save_state_dict

            save_state_dict(state_dict, args.dst)
            print(f"{args.src} ({arch}{', EMA weights' if args.ema else ''}) -> {args.dst}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
