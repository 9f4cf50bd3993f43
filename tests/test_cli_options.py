"""Options are declared once, on the config dataclasses: the Typer commands are built from the fields
(rae_cli/config_command.py), and the presets list only what differs from the fields' defaults."""
import dataclasses
import importlib
import json
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from rae_cli.config_command import config_command
from stages.options import AT_LEAST_1, option
from stages.presets import PRESETS


@dataclass
class ToyConfig:
    data: str = option(help="Input folder.", path=True, argument=True)
    out: str = option(help="Output folder.", short="-o", path=True)
    heads: int | None = option(None, "Attention heads.", check=AT_LEAST_1, flag="--num-heads", alias="--heads")
    lr: float = option(2e-4, "Learning rate.")
    use_shift: bool = option(True, "No time shift.", flag="--no-shift")
    ema: bool = option(True, "EMA weights.")
    flip: bool = option(False, "Mirror too.")
    classes: list[int] | None = option(None, "Only these classes.")
    metrics: tuple[str, ...] = option(("fid", "is"), "Comma-separated metrics.")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas.")
    per_class: int | None = option(None, "K per class.")
    num: int | None = option(None, "N random labels.", replaces=("per_class",))
    chunk: int = option(64, "Not an option.", cli=False)
    seed: int = 0


def _invoke(monkeypatch, *args, stage="toy"):
    """Run the toy command; returns (result, the configs it reported)."""
    monkeypatch.setitem(PRESETS, "p", {"toy": dict(lr=1.0, per_class=5)})
    reported = []
    command = config_command(ToyConfig, lambda cfg: {"cfg": cfg}, stage)(
        lambda result, cfg, preset: reported.append((cfg, preset)))
    app = typer.Typer(rich_markup_mode=None)
    app.command("toy")(command)
    app.command("noop")(lambda: None)  # two commands, so "toy" is a subcommand as in `rae encode`
    return CliRunner().invoke(app, ["toy", *map(str, args)]), reported


def test_defaults_are_the_dataclass_defaults_and_paths_become_strings(monkeypatch, tmp_path):
    result, reported = _invoke(monkeypatch, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert reported == [(ToyConfig(str(tmp_path / "in"), str(tmp_path / "out")), None)]


def test_each_kind_of_option_sets_its_field(monkeypatch):
    result, reported = _invoke(monkeypatch, "in", "--out", "out", "--num-heads", 3, "--lr", 0.5, "--no-shift", "--no-ema",
                               "--flip", "--classes", 2, "--classes", 7, "--metrics", "is, fid", "--betas", 0.5, 0.6)
    assert result.exit_code == 0, result.output
    cfg, _ = reported[0]
    assert (cfg.heads, cfg.lr, cfg.use_shift, cfg.ema, cfg.flip) == (3, 0.5, False, False, True)
    assert cfg.classes == [2, 7] and cfg.metrics == ("is", "fid") and cfg.betas == (0.5, 0.6)


def test_a_hidden_alias_still_works_and_the_option_wins_over_it(monkeypatch):
    assert _invoke(monkeypatch, "in", "-o", "out", "--heads", 5)[1][0][0].heads == 5
    assert _invoke(monkeypatch, "in", "-o", "out", "--heads", 5, "--num-heads", 4)[1][0][0].heads == 4


def test_given_options_win_over_the_preset_which_wins_over_the_defaults(monkeypatch):
    cfg, preset = _invoke(monkeypatch, "in", "-o", "out", "--preset", "p")[1][0]
    assert (cfg.lr, cfg.per_class, cfg.num, preset) == (1.0, 5, None, "p")
    cfg, _ = _invoke(monkeypatch, "in", "-o", "out", "--preset", "p", "--lr", 2e-4)[1][0]
    assert cfg.lr == 2e-4  # given, even though it equals the default
    cfg, _ = _invoke(monkeypatch, "in", "-o", "out", "--preset", "p", "--num", 4)[1][0]
    assert (cfg.per_class, cfg.num) == (None, 4)  # --num replaces the preset's --per-class
    cfg, _ = _invoke(monkeypatch, "in", "-o", "out", "--preset", "p", "--num", 4, "--per-class", 2)[1][0]
    assert (cfg.per_class, cfg.num) == (2, 4)  # both given: both kept (the stage refuses that)
    result, reported = _invoke(monkeypatch, "in", "-o", "out", "--preset", "nope")
    assert result.exit_code == 1 and "unknown preset 'nope'" in result.output and not reported


def test_help_shows_each_option_once_with_its_effective_default(monkeypatch):
    text = " ".join(_invoke(monkeypatch, "--help")[0].output.split())
    assert "--num-heads" in text and "--heads" not in text and "--chunk" not in text and "--seed" not in text
    assert "Learning rate. [default: 2e-4; --preset p: 1]" in text
    assert "--ema / --no-ema EMA weights. [default: --ema]" in text
    assert "--no-shift No time shift. --ema" in text and "--flip Mirror too. --classes" in text  # switches: no default
    assert "--betas <float,float>... AdamW betas. [default: 0.9 0.95]" in text
    assert "--metrics <str> Comma-separated metrics. [default: fid,is]" in text
    assert "K per class. [--preset p: 5]" in text
    assert "--preset" not in " ".join(_invoke(monkeypatch, "--help", stage=None)[0].output.split())


def test_only_the_first_rank_reports(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    result, reported = _invoke(monkeypatch, "in", "-o", "out")
    assert result.exit_code == 0 and reported == []


CONFIGS = {"encode": ("stages.encode", "EncodeConfig"), "train_decoder": ("stages.train.config", "TrainDecoderConfig"),
           "train_diffusion": ("stages.train.config", "TrainDiffusionConfig"), "sample": ("stages.sample", "SampleConfig"),
           "decode": ("stages.decode", "DecodeConfig")}  # stage (its key in the presets): the module of its config


def _config(stage: str):
    module, name = CONFIGS[stage]
    return getattr(importlib.import_module(module), name)


def test_every_preset_value_is_a_field_of_its_stage_and_differs_from_its_default():
    for name, stages in PRESETS.items():
        for stage, values in stages.items():
            fields = {f.name: f for f in dataclasses.fields(_config(stage))}
            for key, value in values.items():
                assert key in fields, f"preset {name}: {stage} has no field {key}"
                # As JSON (what a run's identity digests), so 40 and 40.0 differ.
                assert json.dumps(value) != json.dumps(fields[key].default), f"preset {name}: {stage}.{key} is the default"


@pytest.mark.parametrize("stage", CONFIGS)
def test_every_command_offers_each_option_field_of_its_config(stage):
    from tests.helpers import run_rae

    text = run_rae(stage.replace("_", "-"), "--help").stdout
    for f in dataclasses.fields(_config(stage)):
        if f.metadata.get("cli") and not f.metadata["argument"]:
            assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in text, f.name


def test_no_option_is_taken_by_torchrun():
    """`torchrun ... -m rae_cli.main CMD --opt` hands --opt to rae only when it is not one of torchrun's own
    options nor an abbreviation of one (argparse would take --num for --numa-binding)."""
    import typer as _typer
    from torch.distributed.run import get_args_parser

    from rae_cli.commands import COMMANDS
    from rae_cli.main import app

    theirs = [s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")]
    group = _typer.main.get_command(app)
    for command in COMMANDS:
        params = group.get_command(None, command).params
        ours = {o for p in params if not getattr(p, "hidden", False) for o in p.opts + p.secondary_opts}
        for option in ours - {"--help"}:
            taken = [t for t in theirs if t.startswith(option)]
            assert not taken, f"rae {command} {option} would be read by torchrun as {taken[0]}"
