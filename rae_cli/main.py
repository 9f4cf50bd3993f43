"""The `rae` command: a thin Typer layer. Options -> one config object -> ``stages.<stage>.run``."""
from __future__ import annotations

import typer

from . import commands

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="rae: Diffusion Transformers with Representation Autoencoders, as a pipeline of stages.")

commands.register(app)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
