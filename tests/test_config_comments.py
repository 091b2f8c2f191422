"""The shipped config tree documents itself, as the README promises ("Every YAML begins with a command
that uses it, and every field has a comment"), and the README's layout block names what is there.

A key is documented when the previous non-blank line is a `# ` comment, or when its own line carries
an inline comment. Exempt keys, and why:

- `defaults`: Hydra's composition list, with everything inside it (`- model: tiny`, `- _self_`); the
  file's leading comment and the group folders say what each entry picks.
- `_target_` / `_partial_`: Hydra's instantiation syntax; the comment on the node that holds them
  (`loss:`, `optimizer:`) says what the callable is.
- `name` whose value is the file's own stem (`name: dpo` in algorithm/dpo.yaml): the option naming
  itself. A `name` meaning something else (a hub dataset's config name) needs a comment.

Keys inside a flow mapping (`sft: {train: {path: null}}`) share the line of the key that opens it, and
that key's comment covers them. The YAML is parsed (not matched line by line), so the text of a block
scalar such as the --help template never looks like a key.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from align_runner.validate import CONF_DIR

YAMLS = sorted(CONF_DIR.rglob("*.yaml"))
HYDRA_KEYWORDS = {"_target_", "_partial_"}
# a backquoted command that runs align_runner, e.g. `python -m align_runner algorithm=dpo`
COMMAND = re.compile(r"`[^`]*(?:python -m align_runner|align-runner)[^`]*`")
README = Path(__file__).resolve().parents[1] / "README.md"


def _keys(node: yaml.Node, path: tuple[str, ...] = ()):
    """(dotted key path, key node, value node) of every mapping key under ``node``, outside `defaults`."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == "defaults" and not path:
                continue
            here = (*path, str(key.value))
            yield here, key, value
            yield from _keys(value, here)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _keys(item, path)


def undocumented(path: Path, root: Path = CONF_DIR) -> list[str]:
    """`file:line: key` (file relative to ``root``) for each key of ``path`` without a comment above it
    (or inline)."""
    lines = path.read_text().splitlines()
    tree = yaml.compose(path.read_text())
    first_key_of_line: dict[int, tuple] = {}
    for dotted, key, value in _keys(tree):
        line = key.start_mark.line
        if line not in first_key_of_line or key.start_mark.column < first_key_of_line[line][1].start_mark.column:
            first_key_of_line[line] = (dotted, key, value)
    bad = []
    for line, (dotted, key, value) in sorted(first_key_of_line.items()):
        leaf = dotted[-1]
        if leaf in HYDRA_KEYWORDS or (leaf == "name" and getattr(value, "value", None) == path.stem):
            continue
        # an inline comment follows the value when the value ends on this line (a `#` inside a quoted
        # value is not one)
        after = value.end_mark.column if value.end_mark.line == line else key.end_mark.column
        if "#" in lines[line][after:]:
            continue
        prev = line - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        if prev < 0 or not lines[prev].lstrip().startswith("#"):
            bad.append(f"{path.relative_to(root)}:{line + 1}: {'.'.join(dotted)}")
    return bad


def test_every_key_has_a_comment_above_it():
    assert len(YAMLS) > 50  # the tree is where validate.CONF_DIR says
    bad = [entry for path in YAMLS for entry in undocumented(path)]
    assert not bad, f"{len(bad)} config keys without a comment line above them:\n" + "\n".join(bad)


def test_every_yaml_begins_with_a_command_that_uses_it():
    bad = []
    for path in YAMLS:
        lines = path.read_text().splitlines()
        head = []
        for line in lines:
            if not line.startswith("#"):
                break
            head.append(line)
        if not head or not COMMAND.search("\n".join(head)):
            bad.append(str(path.relative_to(CONF_DIR)))
    assert not bad, "YAMLs whose leading comment has no backquoted `python -m align_runner ...` command:\n" + "\n".join(
        bad
    )


def test_checker_finds_what_it_should(tmp_path):
    """The rule itself: an undocumented key is reported with its line; the exemptions are not."""
    sample = tmp_path / "dpo.yaml"
    sample.write_text(
        "# `python -m align_runner algorithm=dpo`\n"
        "defaults:\n  - preference_schema\n"
        "name: dpo\n"
        "# documented\n\nbeta: 0.1\n"
        "loss:\n  _target_: x.y\n  _partial_: true\n"
        "lr: 5e-6  # inline\n"
        "# flow mapping: its keys share this comment\n"
        "sft: {train: {path: null}}\n"
        "source:\n  # hub config\n  name: other\n  revision: null\n"
        "help: |-\n  looks: like a key\n"
    )
    assert undocumented(sample, root=tmp_path) == [
        "dpo.yaml:8: loss",
        "dpo.yaml:14: source",
        "dpo.yaml:17: source.revision",
        "dpo.yaml:18: help",
    ]


def _readme_tree() -> dict[str, str]:
    """group folder -> its description, from the first code block under "## The config tree"."""
    text = README.read_text().split("## The config tree", 1)[1]
    block = text.split("```", 2)[1]
    groups: dict[str, str] = {}
    current = None
    for line in block.splitlines()[2:]:  # skip the language line and the `align_runner/conf/` root
        match = re.match(r"^  (\S+/)\s+(.*)$", line)
        if match:
            current = match.group(1).rstrip("/")
            groups[current] = match.group(2)
        elif current and line.strip():
            groups[current] += " " + line.strip()
    return groups


def test_readme_layout_matches_the_tree():
    groups = _readme_tree()
    folders = {
        str(p.parent.relative_to(CONF_DIR))
        for p in YAMLS
        if p.parent != CONF_DIR and "experiment" not in p.relative_to(CONF_DIR).parts
    } | {"experiment"}
    assert set(groups) == folders, f"README layout names {sorted(groups)}; the tree has {sorted(folders)}"
    missing = [
        f"{group}/{p.stem}"
        for group in folders - {"experiment"}  # recipes are listed by `align-runner recipes list`
        for p in (CONF_DIR / group).glob("*.yaml")
        if not re.search(rf"(?<![\w.-]){re.escape(p.stem)}(?![\w.-])", groups[group])
    ]
    assert not missing, f"options not named in README's config-tree block: {missing}"
