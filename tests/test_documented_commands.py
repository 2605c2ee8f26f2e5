"""Every snakemake command the README and the config and profile headers show works as written: each
is dry-run (`-n` added) with its own arguments in their own order. Snakemake 9's --configfile takes
every path after it, so a target written after it is read as a config file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, run_snakemake
from test_paper_config import write_placeholder_files

DOCUMENTS = [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "config").glob("*.yaml")),
             *sorted((REPO / "workflow" / "profiles").glob("*/config.yaml"))]
# a command in an inline code span, a code block line or a comment line: up to the span's end or a comment
COMMAND = re.compile(r"(?:^|`|#\s+|\$ )((?:\.venv/bin/)?snakemake\s[^`#\n]*)", re.MULTILINE)
# commands that do not plan a run: tool options, shown as fragments in prose, and the report of a
# finished run (tests/test_figures.py builds it after the tiny run and opens it)
NOT_RUNS = ("--sdm", "--lint", "--unlock", "--report")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for match in COMMAND.finditer(document.read_text()):
            command = match.group(1).strip().rstrip(":;.")
            if not any(option in command for option in NOT_RUNS) and len(shlex.split(command)) > 1:
                found.append((document.name, command))
    return sorted(set(found))


def test_the_documents_show_commands():
    commands = [command for _, command in documented_commands()]
    assert any("config/paper.yaml" in c for c in commands) and any("config/tiny.yaml" in c for c in commands)
    assert any("my.yaml" in c for c in commands)


COMMANDS = documented_commands()


@pytest.mark.parametrize(("document", "command"), COMMANDS, ids=[f"{document}-{i}" for i, (document, _) in enumerate(COMMANDS)])
def test_a_documented_command_plans_as_written(tmp_path, document, command):
    words = shlex.split(command)[1:]  # the program is this environment's snakemake
    if "config/paper.yaml" in words:
        write_placeholder_files(tmp_path)  # the paper's official files, as placeholders
    arguments = []
    for word in words:
        if word == "my.yaml":  # the README's own override file: the tiny config stands in for it
            word = str(REPO / "config" / "tiny.yaml")
        elif word.startswith(("config/", "workflow/")):
            word = str(REPO / word)
        arguments.append(word)
    result = run_snakemake(tmp_path, *arguments, "-n", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{document}: {command}\n{output[-3000:]}"
    assert "FileNotFoundError" not in output
