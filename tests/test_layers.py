"""Arrows point down: no module of resnet_jax imports one of a higher layer.

Layers, bottom to top (a module may import its own layer and those below):
  0  errors, files                    (no resnet_jax imports but each other)
  1  models, data, parallel, console  (the network, the input pipelines, devices, logging)
  2  train, summary                   (the trainer; summaries of models)
  3  interop, analysis, configs       (weight files; the paper's analyses; the recipes)
  4  main, convert, export, experiments (command lines: they wire what lower layers must not import)
Read from the source with `ast`, lazy imports inside functions included.
"""

import ast
from pathlib import Path

import pytest
from _configs import ROOT

PACKAGE = ROOT / "resnet_jax"
LAYERS = {
    "errors": 0,
    "files": 0,
    "models": 1,
    "data": 1,
    "parallel": 1,
    "console": 1,
    "train": 2,
    "summary": 2,
    "interop": 3,
    "analysis": 3,
    "configs": 3,
    "main": 4,
    "convert": 4,
    "export": 4,
    "experiments": 4,
}


def unit(dotted: str) -> str:
    """'resnet_jax.train.loop' -> 'train'; the package itself -> '__init__'."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_units(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from resnet_jax import train` names the unit in the alias
            names = (
                [f"{node.module}.{a.name}" for a in node.names]
                if node.module == "resnet_jax"
                else [node.module]
            )
        else:
            continue
        found |= {unit(n) for n in names if n == "resnet_jax" or n.startswith("resnet_jax.")}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "__init__.py")


def test_every_unit_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert units == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    above = {u for u in imported_units(path) - {"__init__"} if LAYERS[u] > LAYERS[own]}
    assert not above, f"{path.relative_to(ROOT)} (layer {LAYERS[own]}) imports {sorted(above)}"


def test_the_check_sees_lazy_imports(tmp_path):
    """The trainer used to import interop inside a function: such an import must count."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import resnet_jax.files\ndef f():\n    from resnet_jax.interop import weights\n"
        "    from resnet_jax import train\n"
    )
    assert imported_units(probe) == {"files", "interop", "train"}
