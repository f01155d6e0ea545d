"""The README's set-up commands are the ones CI runs, and the README documents every CLI command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert len(ci_lines) == 1, ci_lines
    quick_start = readme.split("## ", 2)[1]  # the first section holds exactly the two set-up commands
    commands = [line.strip() for block in _shell_blocks(quick_start) for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert ci_lines[0] == commands[1]
    assert "octopus-rt infer" in commands[0]


def test_readme_mentions_every_top_level_command():
    import typer

    from octopus_rt.cli import app

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = sorted(typer.main.get_command(app).commands)
    assert names
    for name in names:
        assert f"octopus-rt {name}" in readme, f"README does not document `octopus-rt {name}`"
