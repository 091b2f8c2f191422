"""What an installed wheel needs: every data file of the package (the config tree first) is package
data, and the installed program explains itself. Building and running the wheel in a fresh
virtualenv is scripts/check_wheel.sh (CI, after the tests); these checks are the cheap half."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

import align_runner
from align_runner.validate import CONF_DIR

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; 3.10 runs the wheel check alone

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "align_runner"


def _package_data() -> set[Path]:
    """The files setuptools puts in the wheel beside the modules: it expands each pattern of
    [tool.setuptools.package-data] with glob(package_dir / pattern, recursive=True)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["align_runner"]
    return {Path(p) for pattern in patterns for p in glob.glob(str(PACKAGE / pattern), recursive=True)}


def test_every_data_file_of_the_package_ships_in_the_wheel():
    data = {
        p for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts and not p.name.startswith(".")
    }
    missing = sorted(str(p.relative_to(REPO)) for p in data - _package_data())
    assert not missing, f"not matched by [tool.setuptools.package-data] in pyproject.toml, so left out of the wheel: {missing}"


def test_the_config_tree_hydra_reads_is_package_data():
    yamls = set(CONF_DIR.rglob("*.yaml"))
    assert CONF_DIR.parent == PACKAGE and len(yamls) > 30  # the tree moved into the package, all of it
    assert yamls <= _package_data()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align_runner", *args], capture_output=True, text=True, timeout=120, cwd=REPO.parent)


def test_version_is_the_packages_own():
    out = _cli("--version")
    assert (out.returncode, out.stdout) == (0, f"align_runner {align_runner.__version__}\n")


def test_help_names_the_commands_the_version_flag_and_user_groups(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mydata.yaml").write_text("defaults:\n  - demo\n  - _self_\nname: mydata\n")
    out = _cli("--help", "--config-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for text in ("align-runner sft|dpo|reward|grpo|kto [flags]", "align-runner export", "--version", "--config-dir DIR",
                 "-sc install=bash"):
        assert text in out.stdout, text
    groups = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith(("data: ", "algorithm: ")))
    assert "mydata" in groups["data"].split(", ") and "dpo" in groups["algorithm"].split(", ")
    assert "_schema" not in out.stdout.split("Composed config:")[0]  # internal structured configs are not choices
    assert "\nmodel:\n  name: smollm2-135m\n" in out.stdout  # the composed config follows


def test_help_shows_the_config_its_overrides_compose_and_checks_them():
    assert "\nmodel:\n  name: tiny\n" in _cli("model=tiny", "--help").stdout
    bad = _cli("algorithm=dpoo", "--help")
    assert bad.returncode == 2 and "did you mean" in bad.stderr.lower()
