"""README's sections on each command name only options that rae has (that command's, or another's it
refers to): a renamed or removed option cannot stay documented."""
import re
from pathlib import Path

from typer.testing import CliRunner

from rae_cli.main import app

NOT_RAE = {"--shm-size", "--nproc_per_node", "--nnodes", "--numa-binding"}  # Docker's and torchrun's, quoted in the README


def _help(command: str) -> str:
    return CliRunner().invoke(app, [*command.split(), "--help"], terminal_width=400).output


def test_every_option_in_a_commands_readme_section_is_in_its_help():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sections = {m.group(1): m.group(2) for m in re.finditer(r"^## `rae ([a-z-]+)`\n(.*?)(?=^## )", text, re.M | re.S)}
    assert {"encode", "train-decoder", "train-diffusion", "sample", "decode", "eval"} <= set(sections)
    helps = {c: _help(c) for c in ("encode", "train-decoder", "train-diffusion", "sample", "decode", "eval",
                                   "info", "import", "ema")}
    for command, body in sections.items():
        for option in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", body)) - NOT_RAE):
            has = [c for c, h in helps.items() if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", h)]
            assert has, f"README's `rae {command}` section names {option}, which no rae command has"
