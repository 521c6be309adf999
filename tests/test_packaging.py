"""The two ways to set up (pip + pyproject, conda + environment.yml) install the same things."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> str:
    return "".join(requirement.split()).replace('"', "'").lower()


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {normalise(r) for r in project["dependencies"] + extras["lab"] + extras["test"]}


def conda_pip_requirements() -> tuple[set[str], list[str]]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    editable = [r for r in pip_section if r.startswith("-e")]
    return {normalise(r) for r in pip_section if not r.startswith("-e")}, editable


def test_environment_yml_matches_pyproject():
    conda, editable = conda_pip_requirements()
    pip = pyproject_requirements()
    assert conda - pip == set(), f"only in environment.yml: {sorted(conda - pip)}"
    assert pip - conda == set(), f"only in pyproject.toml: {sorted(pip - conda)}"
    assert editable == ["-e ."]


def test_torch_is_pinned_everywhere():
    assert "torch==2.13.0" in pyproject_requirements()
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
