"""`make install` pins the versions the README's figures were measured with."""

from __future__ import annotations

import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_constraints_pin_every_dependency_within_the_project_s_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    pinned = pins()
    assert "torch" not in pinned  # the TORCH variable picks the build
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def make_dry_run(*args: str) -> str:
    result = subprocess.run(
        ["make", "-n", "install", "VENV=/nonexistent-venv", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_make_install_uses_the_constraints_unless_told_otherwise():
    assert '-c constraints.txt -e ".[dev]"' in make_dry_run()
    newest = make_dry_run("CONSTRAINTS=")
    assert '-e ".[dev]"' in newest and "constraints" not in newest
