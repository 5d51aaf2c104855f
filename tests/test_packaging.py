"""What a non-editable install holds: the package's recipes ship with it, and the experiments
command line finds them without a checkout (built as a wheel, imported from outside the repo)."""

import os
import subprocess
import sys
import zipfile

import pytest
from _configs import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, unpacked into a folder that stands first on sys.path."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp / "site")
    return tmp, names


def run_outside(tmp, code):
    env = dict(os.environ, PYTHONPATH=str(tmp / "site"))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_holds_the_recipes_and_no_top_level_configs(installed):
    _, names = installed
    for recipe in ("cifar10", "cifar100", "imagenet", "finetune_cifar10"):
        assert f"resnet_jax/configs/{recipe}.py" in names
    assert not [n for n in names if n.split("/")[0] in ("configs", "tests", "scripts", "docs")]


def test_experiments_and_recipes_work_from_the_installed_package(installed):
    tmp, _ = installed
    done = run_outside(
        tmp,
        (
            "import resnet_jax, resnet_jax.configs as c\n"
            "from resnet_jax import experiments\n"
            f"assert resnet_jax.__file__.startswith({str(tmp / 'site')!r}), resnet_jax.__file__\n"
            "assert c.load('cifar10', 'resnet110').model.name == 'cifar_resnet110'\n"
            "assert c.load('imagenet', 'resnet50').dataset.name == 'imagenet2012'\n"
            "assert c.load('cifar100').dataset.name == 'cifar100'\n"
            "config = experiments.load_config_file(experiments._PACKAGED_CONFIG, 'plain20')\n"
            "print(config.model.name)\n"
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["cifar_plain20"]
    helped = subprocess.run(
        [sys.executable, "-m", "resnet_jax.experiments", "degradation", "--help"],
        cwd=tmp,
        env=dict(os.environ, PYTHONPATH=str(tmp / "site")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert helped.returncode == 0 and "the package's CIFAR-10 recipe" in " ".join(helped.stdout.split())


def test_an_unknown_recipe_is_named():
    from resnet_jax import configs

    with pytest.raises(ValueError, match="unknown recipe 'cifar11'.*cifar10, cifar100"):
        configs.load("cifar11")
