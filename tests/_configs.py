"""Loads the project's config files (configs/*.py) the way `--config path:arg` does."""

import importlib.util
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]


def load_config(arg: str = "resnet20", file: str = "cifar10.py") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs_{file[:-3]}", ROOT / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
