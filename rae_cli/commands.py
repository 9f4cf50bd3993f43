"""Registers every working `rae` command on the Typer app."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from . import demo_cmd, encode_cmd, info_cmd

    app.command("encode", help=encode_cmd.__doc__)(encode_cmd.encode)
    app.command("info", help=info_cmd.__doc__)(info_cmd.info)
    app.command("demo-data", help=demo_cmd.__doc__)(demo_cmd.demo_data)
