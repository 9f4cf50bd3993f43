"""What the experiments share: training through ``rae train-diffusion`` itself, and the Frechet distance
of a run's samples to the training latents in the encoder's own space (each latent's tokens
mean-pooled: no decoder and no downloaded network)."""
from __future__ import annotations

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


def score_snapshots(name: str, run_dir: Path, every: int, steps: int, scores: dict, num: int, batch: int, ref,
                    device) -> None:
    """The FD of ``run_dir``'s snapshots every ``every`` steps up to ``steps``, into ``scores`` {str(step): FD};
    the steps already there are not scored again."""
    from stages.progress import console

    for step in range(every, steps + 1, every):
        if str(step) not in scores:
            scores[str(step)] = sample_fd(run_dir, step, num, batch, ref, device)
            console.print(f"{name} step {step}: FD {scores[str(step)]:.3f}", highlight=False)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
