"""A stage's options, declared once: the fields of its config dataclass.

A field made with ``option(default, "help", ...)`` is a command-line option of its stage (the
`rae` command is built from the fields by ``rae_cli/config_command.py``): its name, default, help
text and numeric check live on the field. ``check_options`` runs the checks, and refuses a NaN or
infinite value in any float field (a NaN scale or learning rate would otherwise run to the end and
write NaNs into a store or run marked complete). The stages call it first thing in their
``_validate``, so a bad number is one line before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from .errors import RaeError

Check = tuple[Callable[[float], bool], str]   # (test, what the value must be)
AT_LEAST_1: Check = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE: Check = (lambda v: v >= 0, "0 or more")
POSITIVE: Check = (lambda v: v > 0, "positive")
UNIT_INTERVAL: Check = (lambda v: 0 <= v < 1, "in [0, 1)")


def option(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None, flag: str | None = None,
           short: str | None = None, alias: str | None = None, path: bool = False, argument: bool = False,
           replaces: tuple[str, ...] = (), cli: bool = True, choices: tuple[str, ...] = ()) -> Any:
    """A config field that is also an option. No default: required. ``flag``: the option's name when it is
    not --field-name (a bool on by default with ``flag`` has only that switch, which turns it off);
    ``short``: e.g. "-o"; ``alias``: an older name, still accepted, not shown; ``path``: a file or folder;
    ``argument``: positional; ``replaces``: preset values this option clears when given; ``cli=False``:
    not on the command line (set by presets or code), but still checked; ``choices``: the values a
    string option accepts."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check, flag=flag, short=short, alias=alias,
                                                            path=path, argument=argument, replaces=replaces, cli=cli,
                                                            choices=choices))


def precision_option(fp8: bool = False) -> Any:
    """--precision, the same in every stage that runs a network; ``fp8``: the stage also offers float8."""
    fp8_help = (" | fp8 (bf16 with float8 matrix products in the diffusion models: faster on Hopper/Ada, samples "
                "differ slightly; opt-in)") if fp8 else ""
    return option("auto", f"auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32{fp8_help}.",
                  choices=("auto", "bf16", "fp32") + (("fp8",) if fp8 else ()))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flag(field: dataclasses.Field) -> str:
    """The option that sets ``field`` on the command line."""
    return field.metadata.get("flag") or flag(field.name)


def check_options(cfg) -> None:
    """Raise a one-line ``RaeError`` for the first option of ``cfg`` outside its bounds."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise RaeError(f"{field_flag(field)} must be a finite number (got {v})")
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
            raise RaeError(f"{field_flag(field)} must be {allowed} (got {value})")
        if field.metadata.get("check") and value is not None:
            test, what = field.metadata["check"]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not test(v):
                    raise RaeError(f"{field_flag(field)} must be {what} (got {v})")
