"""What the experiments share: training through ``rae train-diffusion`` itself, and the Frechet distance
of a run's samples to the training latents in the encoder's own space (each latent's tokens
mean-pooled: no decoder and no downloaded network)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import flow  # noqa: E402
from stages.artifacts.runs import load_diffusion_run  # noqa: E402
from stages.artifacts.store import open_complete_store  # noqa: E402
from stages.eval import metrics as M  # noqa: E402


def parse(ap) -> tuple:
    """The script's own options, and the rest (after an optional ``--``) for the rae command it drives."""
    args, extra = ap.parse_known_args()
    return args, [a for a in extra if a != "--"]


def parse_scored(ap) -> tuple:
    """``parse`` for the experiments that score snapshots by ``sample_fd``: adds --num, --sample-batch and
    --device; returns (args, extra, device, the training latents' reference statistics)."""
    from stages import dist

    ap.add_argument("--num", type=int, default=2000, help="samples per score (and reference latents)")
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--device", default="auto")
    args, extra = parse(ap)
    return args, extra, dist.init(args.device).device, reference_stats(args.latents, args.num)


def pooled_stats(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of the latents' mean-pooled tokens [N, C]."""
    pooled = np.asarray(latents, dtype=np.float64).mean(axis=(2, 3))
    return pooled.mean(axis=0), np.cov(pooled, rowvar=False)


def reference_stats(store_path: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    _, store = open_complete_store(store_path)
    valid = store.valid_indices()
    pick = valid[np.linspace(0, len(valid) - 1, min(num, len(valid))).round().astype(int)]
    return pooled_stats(store.read(np.unique(pick)))


@torch.no_grad()
def sample_fd(run_dir: Path, step: int, num: int, batch: int, ref, device) -> float:
    """FD of ``num`` EMA samples of ``run_dir`` at ``step`` (seeds 0..num-1, classes in turn), raw space."""
    run = load_diffusion_run(run_dir, device=device, step=step)
    parts = []
    for s in range(0, num, batch):
        seeds = list(range(s, min(s + batch, num)))
        y = torch.tensor(seeds, device=device) % max(run.num_classes, 1)
        noise = flow.seeded_noise(seeds, run.latent_shape).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = flow.sample(lambda z, t: run.model(z, t, y), noise, 50, run.shift, "euler")
        parts.append(run.to_raw(x.float()).cpu().numpy())
    mu, sigma = pooled_stats(np.concatenate(parts))
    return float(M.frechet_distance(mu, sigma, *ref))


def rae(*argv) -> None:
    """One ``rae`` command, run in this process as from the shell: its progress shows as it goes, and a
    SIGTERM or Ctrl-C reaches it (it checkpoints; the experiment resumes when run again)."""
    from rae_cli.main import app

    try:
        code = app([str(a) for a in argv], standalone_mode=False)
    except SystemExit as e:
        code = e.code
    if code:
        raise SystemExit(f"rae {argv[0]} ended with exit code {code}; run the experiment again to resume")


def train(latents: str, out: Path, model: str, steps: int, batch: int, every: int, device: str,
          extra: list[str]) -> None:
    """``rae train-diffusion`` itself (resumed when ``out`` exists), a snapshot every ``every`` steps."""
    rae("train-diffusion", "--latents", latents, "--out", out, "--model", model, "--steps", steps,
        "--batch-size", batch, "--snapshot-every", every, "--checkpoint-every", every, "--sample-every", "0",
        "--num-samples", "0", "--device", device, *extra)


def snapshot_steps(every: int, steps: int) -> list[str]:
    """The steps a run is scored at, as the results files key them."""
    return [str(step) for step in range(every, steps + 1, every)]


def all_scored(every: int, steps: int, scores: dict) -> bool:
    """Whether ``scores`` holds every snapshot's score: then the run need not be trained (again) here."""
    return set(snapshot_steps(every, steps)) <= set(scores)


def score_snapshots(name: str, run_dir: Path, every: int, steps: int, scores: dict, num: int, batch: int, ref,
                    device, save=lambda: None) -> None:
    """The FD of ``run_dir``'s snapshots every ``every`` steps up to ``steps``, into ``scores`` {str(step): FD};
    the steps already there are not scored again; ``save()`` after each new score."""
    from stages.progress import console

    for step in snapshot_steps(every, steps):
        if step not in scores:
            scores[step] = sample_fd(run_dir, int(step), num, batch, ref, device)
            console.print(f"{name} step {step}: FD {scores[step]:.3f}", highlight=False)
            save()


# The results file: what an experiment measured so far, with the settings that measured it. It is written
# after every score, so a killed experiment loses at most the score in progress, and a run whose scores are
# all in it is not trained again: the small file alone carries an experiment on to another machine.
UNSCORED = ("out", "device", "sample_batch")  # options that do not change what is measured


def settings_of(args, extra: list[str], select: tuple[str, ...] = ()) -> dict:
    """The options that decide what each result means. ``select``: options that only choose which parts run
    (more models, more taus), so a result of each part stays valid when they change."""
    skip = UNSCORED + select
    return {**{k: str(v) for k, v in sorted(vars(args).items()) if k not in skip}, "extra": " ".join(extra)}


def load_results(path: Path, settings: dict) -> dict:
    """``path``'s results ({} where there is none); one that other settings made stops the experiment with one
    line, rather than mixing two experiments' numbers."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    theirs = old.get("settings", {})
    differ = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
    if differ:
        raise SystemExit(f"{path} holds results measured with other settings ({', '.join(differ)}): give another "
                         f"--out, or move that file away to start over")
    return old


def save_results(path: Path, settings: dict, **parts) -> None:
    """Write the results file whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, **parts}, indent=1))
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
