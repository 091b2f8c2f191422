"""Tab completion for ``align-runner`` and ``python -m align_runner`` (``-sc install=bash``).

The bash script registers a function that asks the program itself for the words that fit:
``<program> -sc query=bash`` with the line in ``COMP_LINE``, which Hydra answers from the config
tree. The script is ours, not Hydra's: Hydra's knows ``python app.py`` and installed scripts but not
``python -m package``, and its query reads the line through a pattern that takes ``-m align_runner``
for arguments, so the CLI rewrites the line to the installed script's form before Hydra reads it
(``program_args``).
"""

from __future__ import annotations

import os
import sys

PROGRAM = "align-runner"
MODULE = "align_runner"

_BASH = r"""# Tab completion for align-runner and python -m align_runner: eval "$(align-runner -sc install=bash)"
_align_runner_complete()
{
    local words=($COMP_LINE) program choices
    if [[ "${words[0]##*/}" == PROGRAM ]]; then
        program=("${words[0]}")
    elif [[ "${words[1]}" == -m && "${words[2]}" == MODULE ]]; then
        program=("${words[0]}" -m MODULE)
    else
        return  # another python command: bash's default completion (file names) applies
    fi
    choices=$(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" "${program[@]}" -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -W "$choices" -- "${COMP_WORDS[COMP_CWORD]}"))
}
# '=' must not split words, so that `algorithm=d<TAB>` completes the option after the '='
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _align_runner_complete NAMES"""


def _names(argv0: str) -> list[str]:
    """The commands to complete: the installed script, and the python that ran ``python -m
    align_runner -sc install=bash`` (completion of its other commands falls back to file names)."""
    if os.path.basename(argv0) != "__main__.py":
        return [PROGRAM]
    pythons = dict.fromkeys([os.path.basename(sys.executable), "python", "python3"])
    return [PROGRAM, *pythons]


def bash_script(argv0: str) -> str:
    return _BASH.replace("PROGRAM", PROGRAM).replace("MODULE", MODULE).replace("NAMES", " ".join(_names(argv0)))


def bash_uninstall(argv0: str) -> str:
    return f"complete -r {' '.join(_names(argv0))}\nunset -f _align_runner_complete"


def program_args(line: str) -> tuple[str, list[str]]:
    """``line`` (a COMP_LINE) as ``align-runner <args>`` and the args typed after the program,
    whether it was run as ``align-runner``, a path to it, or ``python -m align_runner``."""
    words = line.split()
    start = 1
    for i, w in enumerate(words[:3]):
        if w == MODULE and i > 0 and words[i - 1] == "-m":
            start = i + 1
    args = words[start:]
    return " ".join([PROGRAM, *args]) + (" " if line.endswith(" ") else ""), args


def known_options(words: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Drop ``group=option`` words whose option is no file of the group: Hydra also lists the typing
    schemas registered in its ConfigStore (``algorithm=online_schema``), which are not choices."""
    kept = []
    for word in words:
        group, eq, option = word.lstrip("+~").partition("=")
        if not (eq and option and group in groups and option not in groups[group]):
            kept.append(word)
    return kept
