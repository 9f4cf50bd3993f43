"""Registers every working `rae` command on the Typer app."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from . import (decode_cmd, demo_cmd, encode_cmd, eval_cmd, import_cmd, info_cmd, sample_cmd, train_decoder_cmd,
                   train_diffusion_cmd)

    app.command("encode", help=encode_cmd.__doc__)(encode_cmd.encode)
    app.command("train-decoder", help=train_decoder_cmd.__doc__)(train_decoder_cmd.train_decoder)
    app.command("train-diffusion", help=train_diffusion_cmd.__doc__)(train_diffusion_cmd.train_diffusion)
    app.command("sample", help=sample_cmd.__doc__)(sample_cmd.sample)
    app.command("decode", help=decode_cmd.__doc__)(decode_cmd.decode)
    app.command("eval", help=eval_cmd.__doc__)(eval_cmd.eval_cmd)
    app.command("import", help=import_cmd.__doc__)(import_cmd.import_file)
    app.command("info", help=info_cmd.__doc__)(info_cmd.info)
    app.command("demo-data", help=demo_cmd.__doc__)(demo_cmd.demo_data)
    app.command("demo-report", help=demo_cmd.demo_report.__doc__)(demo_cmd.demo_report)
