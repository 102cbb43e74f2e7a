"""environment.yml (conda-forge) and pyproject.toml declare the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

#: pip name -> conda-forge name(s) where they differ (extras become packages)
PIP_TO_CONDA: dict[str, list[str]] = {
    "dask[array,dataframe,distributed]": ["dask", "distributed"],
    "matplotlib": ["matplotlib-base"],
    "mkdocstrings[python]": ["mkdocstrings", "mkdocstrings-python"],
}
#: conda packages that are not Python dependencies of the project
CONDA_ONLY = {"python", "pip"}
SELF = "flowmodel"


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*)$", requirement)
    assert match, requirement
    return match.group(1).lower(), match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [r for r in extra if not r.startswith(f"{SELF}[")]
    return dict(_split(r) for r in reqs)


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = [d for d in env["dependencies"] if isinstance(d, str)]
    return dict(_split(d) for d in deps)


def test_environment_uses_conda_forge_only() -> None:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    assert "defaults" not in env["channels"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(line.endswith("-e .") for line in pip), (
        "the package itself is installed from the clone"
    )


def test_every_pyproject_dependency_is_in_environment_yml_with_the_same_bounds() -> None:
    conda = conda_requirements()
    problems = []
    for name, spec in pyproject_requirements().items():
        for conda_name in PIP_TO_CONDA.get(name, [re.sub(r"\[.*\]", "", name)]):
            if conda_name not in conda:
                problems.append(f"{name} -> {conda_name}: missing from environment.yml")
            elif conda[conda_name] and conda[conda_name] != spec:
                problems.append(
                    f"{name} -> {conda_name}: pyproject '{spec}' vs environment.yml '{conda[conda_name]}'"
                )
            elif (
                not conda[conda_name]
                and spec
                and conda_name == PIP_TO_CONDA.get(name, [conda_name])[0]
            ):
                problems.append(
                    f"{name} -> {conda_name}: bounds '{spec}' missing in environment.yml"
                )
    assert not problems, "\n".join(problems)


def test_environment_yml_has_nothing_pyproject_lacks() -> None:
    expected = set()
    for name in pyproject_requirements():
        expected.update(PIP_TO_CONDA.get(name, [re.sub(r"\[.*\]", "", name)]))
    extra = set(conda_requirements()) - expected - CONDA_ONLY
    assert not extra, f"in environment.yml but not in pyproject.toml: {sorted(extra)}"


def test_python_version_agrees() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert conda_requirements()["python"] == project["requires-python"]
