"""Typer commands built from a stage's config dataclass: every ``option()`` field (stages/options.py) is
one parameter with the field's name, default and help, so an option is declared in one place.

Typer reads a command's parameters from ``inspect.signature``; ``config_command`` writes that signature.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from stages.options import flag
from stages.presets import PRESETS, preset_defaults

from .common import user_errors


def build_config(cls, stage: str | None, preset: str | None, **options):
    """Config object for ``stage``: options the user gave win over the preset's values, which win over
    the dataclass defaults; an option given clears the preset values it ``replaces``. Paths become
    strings (configs are written as JSON)."""
    cleared = {name for f in dataclasses.fields(cls) if f.name in options for name in f.metadata.get("replaces", ())}
    merged = {k: v for k, v in preset_defaults(preset, stage).items() if k not in cleared}
    merged.update({k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})
    return cls(**merged)


def config_command(cls, run: Callable[[Any], dict], stage: str | None = None):
    """Decorator: ``report(result, cfg, preset)`` becomes the Typer command of ``cls`` (its docstring the
    help), with --preset when ``stage`` (the stage's key in the presets) is given. The command builds the
    config from the options given, calls ``run(cfg)`` and reports on the first rank only (torchrun runs
    the command on every rank)."""
    hints = typing.get_type_hints(cls)
    params, fields = [], {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli"):
            for param, convert in _parameters(f, hints[f.name], stage):
                params.append(param)
                fields[param.name] = (f.name, convert)
    if stage:  # every preset names a configuration of the whole pipeline
        required = sum(p.default.default is ... for p in params)
        params.insert(required, _param("preset", Optional[str], typer.Option(
            None, "--preset", help=f"Named defaults: {' | '.join(PRESETS)}.")))

    def decorate(report: Callable[[dict, Any, Optional[str]], None]):
        @user_errors
        def command(ctx: typer.Context, **values):
            given = {k: v for k, v in values.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
            preset = given.pop("preset", None)
            options: dict[str, Any] = {}
            for name, value in given.items():
                field_name, convert = fields[name]
                options.setdefault(field_name, convert(value))  # the option wins over its alias
            cfg = build_config(cls, stage, preset, **options)
            result = run(cfg)
            if os.environ.get("RANK", "0") == "0":
                report(result, cfg, preset)

        signature = [_param("ctx", typer.Context, inspect.Parameter.empty), *params]
        command.__signature__ = inspect.Signature(signature)
        command.__annotations__ = {p.name: p.annotation for p in signature}
        command.__name__, command.__doc__ = report.__name__, report.__doc__
        return command

    return decorate


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _parameters(f: dataclasses.Field, hint, stage: str | None):
    """The Typer parameter(s) of field ``f``, each with the function that turns its value into the field's."""
    meta = f.metadata
    if typing.get_origin(hint) in (typing.Union, types.UnionType):   # X | None: the option's type is X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    name = meta["flag"] or flag(f.name)
    default = ... if f.default is dataclasses.MISSING else f.default
    shown, convert = default, (lambda v: v)
    if hint is bool:
        if f.default and not meta["flag"]:    # on by default: --x/--no-x
            name, shown = f"{name}/--no-{name[2:]}", name
        else:                                  # a switch that flips the default
            default, shown, convert = False, None, (lambda v, flipped=not f.default: flipped)
    elif hint == tuple[str, ...]:              # a comma-separated list
        hint, default = str, ",".join(default)
        shown, convert = default, (lambda v: tuple(m.strip() for m in v.split(",") if m.strip()))
    elif hint == tuple[float, ...]:            # a comma-separated list of numbers
        hint, default = str, None if default is None else ",".join(f"{v:g}" for v in default)
        shown, convert = default, _numbers(f)
    elif typing.get_origin(hint) is list:
        convert = list
    elif meta["path"]:
        hint = Path
    annotation = hint if default is ... else Optional[hint]
    help = meta["help"] + _notes(None if default is ... else shown, f, stage)
    if meta["argument"]:
        yield _param(f.name, annotation, typer.Argument(default, help=help, show_default=False)), convert
        return
    names = [name, meta["short"]] if meta["short"] else [name]
    yield _param(f.name, annotation, typer.Option(default, *names, help=help, show_default=False)), convert
    if meta["alias"]:
        yield _param(f"{f.name}_alias", annotation, typer.Option(None, meta["alias"], hidden=True)), convert


def _numbers(f: dataclasses.Field):
    def convert(value: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a comma-separated list of numbers",
                                     param_hint=f.metadata["flag"] or flag(f.name)) from None
    return convert


def _notes(shown, f: dataclasses.Field, stage: str | None) -> str:
    """``  [default: X; --preset demo: Y]``: the effective defaults, shown in the help."""
    notes = [] if shown is None else [f"default: {_shown(shown)}"]
    by_preset = {p: stages[stage][f.name] for p, stages in PRESETS.items()
                 if stages.get(stage, {}).get(f.name, f.default) != f.default}
    if by_preset:
        notes.append("--preset " + ", ".join(f"{p}: {_shown(v)}" for p, v in by_preset.items()))
    return f"  [{'; '.join(notes)}]" if notes else ""


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:   # 2e-4, not 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(_shown(v) for v in value)
    return str(value)
