r"""Host input-pipeline throughput (images/s) on real JPEGs, against the Flax example's design.

  python scripts/benchmark_input.py --images DIR --peer PEER.py             # batch 32, each file 12x
  python scripts/benchmark_input.py --images DIR --peer PEER.py --batch 32 --repeat 4 --rounds 3

`--images`: a folder of real ImageNet JPEGs named `<wnid>_*.JPEG`; `--peer`: a Python file
defining `peer_dataset(paths, labels, batch, train)`, a tf.data pipeline to compare against.

Measured in one process, on the same files, so the ratios are what to read:
- `inception`: resnet_jax's Inception-style train transform (`transform='inception'`),
- `paper`: resnet_jax's He et al. Sec. 3.4 train transform (scale aug + PCA lighting),
- `eval_center`: resnet_jax's Resize(256) + CenterCrop(224) evaluation,
- `peer_train` / `peer_eval`: the peer pipeline of `--peer` (e.g. the Flax ImageNet example's
  input pipeline design restated over a file list; imported by path, not copied).
Every pipeline is built, warmed up (`--warmup` batches, which also fills the prefetch
buffers), then timed over `--batches` batches; pipelines take turns for `--rounds` rounds
and the median per pipeline is reported, so machine load affects all of them alike.
Two rates: images per wall-clock second, and images per CPU second of the process (all
threads; the fair one on a machine shared with other work, since the input pipeline is
CPU-bound). Ratios of both: inception / peer_train, paper / peer_train,
eval_center / peer_eval.
Prints one JSON object. Needs TensorFlow (the `[tf]` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of <wnid>_*.JPEG files")
    p.add_argument("--peer", required=True, help="path of the peer pipeline module (defines peer_dataset)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=12, help="each file appears this many times")
    p.add_argument("--warmup", type=int, default=12, help="batches before timing (fills prefetch buffers)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="tf.data threads for resnet_jax (default: all)")
    args = p.parse_args(argv)
    if not Path(args.images).is_dir():
        p.error(f"--images {args.images}: no such folder (give a folder of <wnid>_*.JPEG files)")
    if not Path(args.peer).is_file():
        p.error(f"--peer {args.peer}: no such file (give a Python file defining peer_dataset)")
    return args


def image_files(directory: Path) -> list[tuple[Path, str]]:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        sys.exit(f"{directory}: no .JPEG files")
    return [(p, p.name.split("_")[0]) for p in files]


def build_folder(files, repeat: int, root: Path) -> Path:
    """root/{train,val}/<wnid>/<k>_<name> symlinks: each file `repeat` times."""
    for split in ("train", "val"):
        for path, wnid in files:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(repeat):
                os.symlink(path, root / split / wnid / f"{k}_{path.name}")
    return root


def load_peer(path: str):
    spec = importlib.util.spec_from_file_location("flax_input_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tf.function's autograph looks functions up by module
    spec.loader.exec_module(module)
    return module


def measure(make_iterator, warmup: int, batches: int, batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process, all threads)."""
    iterator = make_iterator()
    for _ in range(warmup):
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return batches * batch / wall, batches * batch / cpu


def main(argv=None) -> dict:
    args = parse(argv)
    import tensorflow as tf

    from resnet_jax.data import imagenet

    peer = load_peer(args.peer)
    files = image_files(Path(args.images))
    with tempfile.TemporaryDirectory() as tmp:
        root = build_folder(files, args.repeat, Path(tmp) / "imagenet")
        spec = imagenet.ImageNetSpec("folder", str(root))
        paths = [str(p) for p, _ in files] * args.repeat
        labels = [0] * len(paths)
        n_eval = imagenet.num_examples(spec, "eval")
        needed = (args.warmup + args.batches) * args.batch
        if n_eval < needed:
            sys.exit(
                f"--repeat {args.repeat} gives {n_eval} images, fewer than the {needed} one eval pass needs"
            )

        def ours_train(transform):
            return lambda: imagenet.train_batches(
                spec,
                seed=0,
                start_step=0,
                global_batch=args.batch,
                process_index=0,
                process_count=1,
                transform=transform,
                threads=args.threads,
            )

        pipelines = {
            "inception": ours_train("inception"),
            "paper": ours_train("paper"),
            "eval_center": lambda: imagenet.eval_batches(
                spec,
                protocol="center",
                per_process_batch=args.batch,
                process_index=0,
                process_count=1,
                threads=args.threads,
            ),
            "peer_train": lambda: peer.peer_dataset(
                paths, labels, args.batch, train=True
            ).as_numpy_iterator(),
            "peer_eval": lambda: peer.peer_dataset(
                paths, labels, args.batch, train=False
            ).as_numpy_iterator(),
        }
        rates = {name: [] for name in pipelines}
        cpu_rates = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, make in pipelines.items():
                wall, cpu = measure(make, args.warmup, args.batches, args.batch)
                rates[name].append(wall)
                cpu_rates[name].append(cpu)
    median = {name: statistics.median(r) for name, r in rates.items()}
    cpu_median = {name: statistics.median(r) for name, r in cpu_rates.items()}
    result = {
        "images_per_s": {name: round(v, 1) for name, v in median.items()},
        "images_per_cpu_s": {name: round(v, 1) for name, v in cpu_median.items()},
        "rounds": {name: [round(v, 1) for v in r] for name, r in rates.items()},
        "batch": args.batch,
        "files": len(files),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "tensorflow": tf.__version__,
    }
    pairs = {
        "inception_vs_peer_train": ("inception", "peer_train"),
        "paper_vs_peer_train": ("paper", "peer_train"),
        "eval_center_vs_peer_eval": ("eval_center", "peer_eval"),
    }
    for label, (ours, theirs) in pairs.items():
        result[f"ratio_{label}"] = round(median[ours] / median[theirs], 3)
        result[f"cpu_ratio_{label}"] = round(cpu_median[ours] / cpu_median[theirs], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
