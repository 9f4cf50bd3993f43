"""The `rae` commands, each imported only when it runs or shows its help: the stages import torch,
which would make `rae --help` and `rae info` wait seconds for it."""
from __future__ import annotations

import ast
import importlib
from collections.abc import Mapping
from pathlib import Path

import typer
from typer.core import TyperGroup

COMMANDS = {  # name: (module of rae_cli, function)
    "encode": ("encode_cmd", "report_encode"),
    "train-decoder": ("train_decoder_cmd", "report_train_decoder"),
    "train-diffusion": ("train_diffusion_cmd", "report_train_diffusion"),
    "sample": ("sample_cmd", "report_sample"),
    "decode": ("decode_cmd", "report_decode"),
    "crop": ("crop_cmd", "report_crop"),
    "eval": ("eval_cmd", "report_eval"),
    "ema": ("ema_cmd", "report_ema"),
    "import": ("import_cmd", "report_import"),
    "info": ("info_cmd", "info"),
    "demo-data": ("demo_cmd", "demo_data"),
    "demo-report": ("demo_cmd", "demo_report"),
}


class _Lazy(Mapping):
    """The commands by name, each built (its module imported) the first time it is looked up."""

    def __init__(self) -> None:
        self.built: dict = {}

    def __getitem__(self, name: str):
        if name not in self.built:
            module, function = COMMANDS[name]
            one = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
            one.command(name)(getattr(importlib.import_module(f"{__package__}.{module}"), function))
            self.built[name] = typer.main.get_command(one)
        return self.built[name]

    def __iter__(self):
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class Commands(TyperGroup):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.commands = _Lazy()

    def format_commands(self, ctx, formatter) -> None:
        """The list of `rae --help`: the first line of each command's docstring, read without importing it."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        with formatter.section("Commands"):
            formatter.write_dl([(name, _summary(*COMMANDS[name], limit)) for name in COMMANDS])


def _summary(module: str, function: str, limit: int) -> str:
    tree = ast.parse(Path(__file__).with_name(f"{module}.py").read_text())
    doc = next(ast.get_docstring(node) for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    line = " ".join(doc.split("\n\n")[0].split())
    return line if len(line) <= limit else line[:limit - 3].rsplit(" ", 1)[0] + "..."
