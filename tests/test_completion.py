"""Tab completion: `-sc install=bash` prints a script for the program as it was run, and that
script's function, run in a real bash, completes group options from the shipped tree and the user's
--config-dir (through main, whose override checks must let the query through)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import cli_env

from align_runner import completion
from align_runner.validate import CONF_DIR

BASH = shutil.which("bash")
ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "algorithm").mkdir()
    (tmp_path / "algorithm" / "myalgo.yaml").write_text("defaults:\n  - grpo\n  - _self_\nname: myalgo\n")
    return tmp_path


def _install(*program: str) -> str:
    out = subprocess.run([*program, "-sc", "install=bash"], capture_output=True, text=True, timeout=120, env=cli_env())
    assert out.returncode == 0, out.stderr
    return out.stdout


def _complete(script: str, line: str, cwd: Path) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end, inside its last word)."""
    bash = "\n".join([
        script,
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}",
        "COMP_WORDS=($COMP_LINE); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))",
        "_align_runner_complete",
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    out = subprocess.run([BASH, "-c", bash], capture_output=True, text=True, timeout=120, cwd=cwd, env=cli_env())
    assert out.returncode == 0, out.stderr
    return sorted(w for w in out.stdout.split("\n") if w)


def test_install_script_completes_the_program_as_it_was_run():
    names = _install(sys.executable, "-m", "align_runner").rstrip().rpartition("-F _align_runner_complete ")[2]
    assert set(names.split()) == {"align-runner", "python", "python3", Path(sys.executable).name}
    script = completion.bash_script("/venv/bin/align-runner")
    assert script.rstrip().endswith("-F _align_runner_complete align-runner")
    assert completion.bash_uninstall("/venv/bin/align-runner") == "complete -r align-runner\nunset -f _align_runner_complete"


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_python_m_form_completes_shipped_and_user_algorithms(user_dir, tmp_path):
    script = _install(sys.executable, "-m", "align_runner")
    got = _complete(script, f"{sys.executable} -m align_runner --config-dir {user_dir} algorithm=", cwd=tmp_path)
    # the files of both trees; not the typing schemas Hydra's ConfigStore also holds (online_schema)
    assert got == sorted(f"algorithm={o}" for o in [*ALGORITHMS, "myalgo"])
    assert _complete(script, f"{sys.executable} -m align_runner algorithm=my", cwd=tmp_path) == []


@pytest.mark.skipif(BASH is None or shutil.which("align-runner") is None, reason="needs bash and the align-runner script")
def test_installed_script_completes_keys_and_searchpath_groups(user_dir, tmp_path):
    script = _install(shutil.which("align-runner"))
    assert _complete(script, f"align-runner hydra.searchpath=[file://{user_dir}] algorithm=my", cwd=tmp_path) == ["algorithm=myalgo"]
    assert "train.lr=" in _complete(script, "align-runner -m train.l", cwd=tmp_path)


def test_the_query_line_is_read_as_the_installed_scripts():
    assert completion.program_args("python3 -m align_runner -m algorithm=d") == ("align-runner -m algorithm=d", ["-m", "algorithm=d"])
    assert completion.program_args("/venv/bin/align-runner -cd conf ") == ("align-runner -cd conf ", ["-cd", "conf"])
    groups = {"algorithm": ["dpo", "grpo"]}
    words = ["algorithm=dpo", "algorithm=online_schema", "+algorithm=grpo", "train.lr=", "algorithm@upstream.sft="]
    assert completion.known_options(words, groups) == ["algorithm=dpo", "+algorithm=grpo", "train.lr=", "algorithm@upstream.sft="]
