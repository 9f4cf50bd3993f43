"""The `rae` command: a thin Typer layer. Options -> one config object -> ``stages.<stage>.run``."""
from __future__ import annotations

import typer

from .commands import Commands

app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


@app.callback()
def rae() -> None:
    """rae: Diffusion Transformers with Representation Autoencoders, as a pipeline of stages."""


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
