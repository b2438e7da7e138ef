"""The documentation runs: every Python block of the READMEs executes, and every ``vision-eff`` command the
Markdown files quote (beside a result or as an instruction) names options the CLI still has."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vision_eff import cli

ROOT = Path(__file__).resolve().parents[1]
# distill/README.md's block loads a checkpoint that its recipe makes first: not runnable on a fresh clone
READMES = [ROOT / "README.md", ROOT / "samplers" / "README.md"]
MARKDOWN = sorted(p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def _python_blocks() -> list:
    out = []
    for path in READMES:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            where = f"{path.relative_to(ROOT)}#{i}"
            out.append(pytest.param(where, block, id=where))
    return out


def _commands() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for path in MARKDOWN:
        for cmd in re.findall(r"`(vision-eff [^`]+)`", path.read_text()):
            found.setdefault(cmd, str(path.relative_to(ROOT)))
    return sorted((where, cmd) for cmd, where in found.items())


@pytest.mark.parametrize("where,code", _python_blocks())
def test_readme_python_block_runs(where, code, monkeypatch):
    monkeypatch.chdir(ROOT)  # the blocks name repository paths, as a reader at the root would
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


def _help(path: list[str], capsys) -> str:
    try:  # the top-level parser returns its exit code, the benchmarks' own parsers exit
        code = cli.main([*path, "--help"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    assert code in (0, None) and "usage:" in out, f"`vision-eff {' '.join(path)} --help` failed"
    return out


def test_quoted_commands_use_existing_options(capsys):
    commands = _commands()
    assert any("bench vit" in c for _, c in commands)  # the scan sees the result files' commands
    groups = {"bench", "zoo", "samplers"}
    for where, cmd in commands:
        words = shlex.split(cmd)[1:]
        assert words[0] in {"generate", *groups}, f"{where}: `{cmd}` names no vision-eff command"
        path = words[:2] if words[0] in groups and len(words) > 1 and not words[1].startswith("-") else words[:1]
        helptext = _help(path, capsys)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), (
                f"{where}: `{cmd}` uses {flag}, which `vision-eff {' '.join(path)} --help` does not list")
