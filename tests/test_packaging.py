"""The wheel holds every subpackage: pyproject lists packages by hand, and an editable install hides a
missing one (it resolves imports from the source tree), so a plain `pip install .` would break."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(settings["packages"]), settings["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((package, *parts)))
    assert found - listed == set(), "subpackages missing from [tool.setuptools] packages"
    assert listed - found == set(), "packages listed that do not exist"
