"""Sample a trained diffusion run into a sample store of generated latents (raw encoder space)."""
from __future__ import annotations

from stages.progress import console
from stages.sample import SampleConfig, run

from .config_command import config_command


@config_command(SampleConfig, run, "sample")
def report_sample(result: dict, cfg: SampleConfig, preset: str | None) -> None:
    """Sample a trained diffusion run into a sample store of generated latents (raw encoder space).

    Each sample's noise comes from its own seed, so the store is the same at any batch size and on
    any number of GPUs (`torchrun --nproc_per_node N`). Run it again after an interruption to resume.
    Decode the store with `rae decode`.
    """
    s = result["sampling"]
    speed = f", {result['images_per_second']:,.2f} img/s" if "images_per_second" in result else ""
    nfe = result.get("model_evaluations") or {}
    if nfe.get("batches") and s["solver"] not in ("euler", "heun", "euler-ref"):
        speed += (f", {nfe['total']} model evaluations over {nfe['batches']} batches "
                  f"({nfe['per_batch_min']}-{nfe['per_batch_max']} per batch)")
    console.print(f"[bold green]done:[/] {result['store']}: {result['entries']} samples {result['latent_shape']}, "
                  f"{s['solver']} {s['steps']} steps, guidance {s['guidance']} (scale {s['scale']}){speed}",
                  highlight=False)
