"""Post-hoc EMA: a new diffusion run with the EMA of any length, made from a --phema run's snapshots."""
from __future__ import annotations

from stages.ema import EmaConfig, run
from stages.progress import console

from .config_command import config_command


@config_command(EmaConfig, run)
def report_ema(result: dict, cfg: EmaConfig, preset: None) -> None:
    """Post-hoc EMA: a new diffusion run with the EMA of any length, made from a --phema run's snapshots.

    EDM2's reconstruction: train with `rae train-diffusion --phema 0.05,0.10 --snapshot-every N`, then
    `rae ema RUN --std 0.07 --out RUN_0.07` (any --std, at any snapshot --step) and sample or score the
    new run as any other (`rae sample`, `rae eval --model`).
    """
    console.print(f"[bold green]done:[/] {result['run']}: EMA of relative std {result['std']:g} (power {result['gamma']:.3f}) "
                  f"at step {result['step']}, from {result['snapshots']} snapshots of std "
                  f"{', '.join(f'{s:g}' for s in result['from_stds'])}; relative residual of the profile "
                  f"{result['relative_residual']:.2e}", highlight=False, soft_wrap=True)
