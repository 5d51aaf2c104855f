"""Builds a config the way `python -m resnet_jax.main --config FILE:ARG --config.FIELD=VALUE` does."""

from _configs import ROOT
from absl import flags
from ml_collections import config_flags


def config_from_command_line(spec: str, *overrides: str):
    """`spec`: 'imagenet.py:resnet50,goyal' (a file of configs/); `overrides`: '--config.batch_size=1024'.

    Parsed by ml_collections' config_flags, as main.py does (locked: an unknown field is refused),
    on a fresh flag registry so tests do not share absl's global flags.
    """
    argv = ["prog", f"--config={ROOT / 'configs' / spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config
