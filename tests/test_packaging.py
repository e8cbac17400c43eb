"""Packaging: what pyproject.toml tells setuptools to put into a wheel (read, not built: fast)."""
import fnmatch
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "sparseops" / "__init__.py").exists(),
                                reason="needs the source tree (these tests also run against an installed wheel)")


def setuptools_config():
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():  # setuptools' deprecation notes on other fields
        warnings.simplefilter("ignore")
        return read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]


def test_every_subpackage_is_shipped():
    # A fixed `packages = ["sparseops"]` once dropped sparseops.tickets from wheels.
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sparseops").rglob("__init__.py")}
    packages = set(setuptools_config()["packages"])
    assert "sparseops.tickets" in packages
    assert packages == on_disk  # and nothing else: no tests, benchmarks or __pycache__


def test_json_data_is_shipped():
    package_data = setuptools_config()["package-data"]
    for path in (ROOT / "sparseops").rglob("*.json"):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        globs = package_data.get(package, []) + package_data.get("", []) + package_data.get("*", [])
        assert any(fnmatch.fnmatch(path.name, g) for g in globs), f"{path} is not package data"
