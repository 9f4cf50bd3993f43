import numpy as np
import pytest
import torch

from stages import flow
from stages.errors import RaeError
from stages.artifacts.manifest import read_manifest
from stages.artifacts.runs import load_diffusion_run
from stages.sample import run
from stages.artifacts.store import LatentStore
from tests.helpers import ENCODER, LATENT, make_diffusion_run, sample_config, store_latents


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_diffusion_run(root / "xl", seed=0), make_diffusion_run(root / "s", seed=1)


def test_store_layout_raw_space_and_manifest(runs, tmp_path):
    out = tmp_path / "s.zarr"
    run(sample_config(runs[0], out, seed=7, batch_size=1))  # batches of one, as the direct computation below
    m = read_manifest(out, kind="sample-store")
    s = LatentStore(out)
    assert s.latents.shape == (10, *LATENT) and s.complete
    assert list(np.asarray(s.group["seeds"][:])) == list(range(7, 17))
    assert s.attrs["encoder"] == ENCODER and s.attrs["class_names"] == ["a", "b", "c"]
    assert m["sampling"]["solver"] == "euler" and m["inputs"]["model"]["content_id"] == "run-0"
    # Raw encoder space: the stage's output is the model-space ODE result denormalised with the run's stats.
    r = load_diffusion_run(runs[0])
    noise = torch.randn(*LATENT, generator=torch.Generator().manual_seed(7))[None]
    y = torch.as_tensor(np.asarray(s.labels[:1]))
    with torch.no_grad():
        x = flow.sample(lambda x, t: r.model(x, t, y), noise, 4, 2.0, "euler")
    expected = x * torch.sqrt(r.var + 1e-5) + r.mean
    np.testing.assert_array_equal(store_latents(out)[:1], expected.numpy())


def test_same_samples_at_any_batch_size(runs, tmp_path):
    run(sample_config(runs[0], tmp_path / "a.zarr", batch_size=8))
    run(sample_config(runs[0], tmp_path / "b.zarr", batch_size=3))
    a, b = store_latents(tmp_path / "a.zarr"), store_latents(tmp_path / "b.zarr")
    # The noise is bit-identical; only the float32 matmuls may round differently at another batch size
    # (another blocking of the same dot products). Error model: each dot product has K <= 64 terms,
    # so one model evaluation moves by at most ~K u |v| (u = 2^-24: 4e-6 |v|, |v| = O(1) here); 4 Euler
    # steps of size <= 1 add up at most 4 such perturbations, grown by the tiny model's Lipschitz
    # constant (O(1) at these weights), then scaled by sqrt(var + eps) <= 1.3: ~1e-5. The bound 1e-4
    # leaves 10x for that, on any CPU, and is 100x below what another seed changes (next line).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(a[0] - a[1]).max() > 1e-2  # different seeds, different samples
    assert torch.equal(flow.seeded_noise([5, 6, 7], LATENT)[1:], flow.seeded_noise([6, 7], LATENT))


def test_per_class_gives_exactly_k_per_class(runs, tmp_path):
    out = tmp_path / "p.zarr"
    run(sample_config(runs[0], out, num=None, per_class=3, steps=1))
    labels = np.asarray(LatentStore(out).labels[:])
    assert np.bincount(labels, minlength=3).tolist() == [3, 3, 3]
    run(sample_config(runs[0], tmp_path / "q.zarr", num=None, per_class=2, classes=[2, 0], steps=1))
    assert sorted(np.asarray(LatentStore(tmp_path / "q.zarr").labels[:]).tolist()) == [0, 0, 2, 2]


def test_random_labels_are_seeded(runs, tmp_path):
    from stages.generation import sample_labels

    a = sample_labels(sample_config(runs[0], tmp_path / "x", num=50, seed=3), 3)
    assert (a == sample_labels(sample_config(runs[0], tmp_path / "x", num=50, seed=3), 3)).all()
    assert set(a.tolist()) == {0, 1, 2}
    with pytest.raises(RaeError):
        run(sample_config(runs[0], tmp_path / "y.zarr", num=4, per_class=2))


def test_resume_after_interruption_gives_the_same_store(runs, tmp_path, monkeypatch):
    full = tmp_path / "full.zarr"
    run(sample_config(runs[0], full, num=20))
    out = tmp_path / "cut.zarr"
    original = LatentStore.write_block
    calls = []

    def dying(self, b, *a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed while the second block was being sampled
        calls.append(b)
        return original(self, b, *a, **k)

    monkeypatch.setattr(LatentStore, "write_block", dying)
    with pytest.raises(KeyboardInterrupt):
        run(sample_config(runs[0], out, num=20))
    assert not read_manifest(out, require_complete=False)["complete"]
    monkeypatch.setattr(LatentStore, "write_block", lambda self, b, *a, **k: (calls.append(b), original(self, b, *a, **k)))
    run(sample_config(runs[0], out, num=20))
    assert calls == [0, 1, 2]  # block 0 was not redone
    # The same batches as the uninterrupted run: the same kernels, so the same bits.
    np.testing.assert_array_equal(store_latents(out), store_latents(full))
    assert read_manifest(out, kind="sample-store")["complete"]


def test_cfg_scale_one_equals_no_guidance(runs, tmp_path):
    run(sample_config(runs[0], tmp_path / "none.zarr"))
    run(sample_config(runs[0], tmp_path / "cfg1.zarr", guidance="cfg", cfg_scale=1.0))
    run(sample_config(runs[0], tmp_path / "cfg3.zarr", guidance="cfg", cfg_scale=3.0))
    none = store_latents(tmp_path / "none.zarr")
    np.testing.assert_array_equal(store_latents(tmp_path / "cfg1.zarr"), none)
    assert np.abs(store_latents(tmp_path / "cfg3.zarr") - none).max() > 1e-3


def test_autoguidance_by_the_model_itself_equals_no_guidance(runs, tmp_path):
    run(sample_config(runs[0], tmp_path / "none.zarr"))
    run(sample_config(runs[0], tmp_path / "self.zarr", guidance="autoguidance", guide_model=str(runs[0]),
                      ag_scale=1.42))
    run(sample_config(runs[0], tmp_path / "ag.zarr", guidance="autoguidance", guide_model=str(runs[1]), ag_scale=1.42))
    none = store_latents(tmp_path / "none.zarr")
    np.testing.assert_array_equal(store_latents(tmp_path / "self.zarr"), none)
    assert np.abs(store_latents(tmp_path / "ag.zarr") - none).max() > 1e-3
    m = read_manifest(tmp_path / "ag.zarr")
    assert m["inputs"]["guide"]["content_id"] == "run-1" and m["sampling"]["scale"] == 1.42


def test_guide_from_another_latent_space_is_refused(runs, tmp_path):
    other = make_diffusion_run(tmp_path / "other", encoder={**ENCODER, "weights_sha256": "b" * 64})
    with pytest.raises(RaeError, match="another encoder"):
        run(sample_config(runs[0], tmp_path / "x.zarr", guidance="autoguidance", guide_model=str(other)))


def test_changed_settings_refuse_to_reuse_the_store(runs, tmp_path):
    out = tmp_path / "s.zarr"
    run(sample_config(runs[0], out, num=4))
    with pytest.raises(RaeError, match=r"made differently \(--steps 4 there, 5 here\)"):
        run(sample_config(runs[0], out, num=4, steps=5))
    run(sample_config(runs[0], out, num=4, steps=5, overwrite=True))
    assert read_manifest(out)["config"]["steps"] == 5


def test_sde_and_adaptive_solvers_record_their_settings_and_model_evaluations(runs, tmp_path):
    from tests.helpers import run_rae

    base = ["sample", "--model", runs[0], "--number", 6, "--steps", 3, "--device", "cpu", "--block-size", 64,
            "--batch-size", 4]
    proc = run_rae(*base, "--out", tmp_path / "sde.zarr", "--solver", "sde-heun", "--diffusion-form", "constant",
                   "--last-step", "Tweedie", "--last-step-size", 0.05)
    m = read_manifest(tmp_path / "sde.zarr")
    assert {k: m["sampling"][k] for k in ("solver", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")} \
        == dict(solver="sde-heun", diffusion_form="constant", diffusion_norm=1.0, last_step="Tweedie", last_step_size=0.05)
    # Heun: 2 evaluations per step, then the last step: 7 per batch, 2 batches (4 + 2).
    assert m["model_evaluations"] == {"batches": 2, "total": 14, "per_batch_min": 7, "per_batch_max": 7}
    lat = store_latents(tmp_path / "sde.zarr")
    assert np.isfinite(lat).all()
    proc = run_rae(*base, "--out", tmp_path / "ode.zarr", "--solver", "dopri5", "--rtol", 1e-4)
    m = read_manifest(tmp_path / "ode.zarr")
    assert m["sampling"]["rtol"] == 1e-4 and "last_step" not in m["sampling"]
    assert m["model_evaluations"]["total"] >= 2 * 6 and "model evaluations" in proc.stdout + proc.stderr
    # The SDE's options are no part of an Euler store's identity (stores made before them keep theirs).
    a = sample_config(runs[0], tmp_path / "e.zarr")
    assert "diffusion_form" not in a.identity() and "atol" not in a.identity()
    proc = run_rae(*base, "--out", tmp_path / "x.zarr", "--solver", "sde-euler", "--diffusion-form", "SBDM",
                   check=False)
    assert proc.returncode != 0 and "--diffusion-form must be" in proc.stdout + proc.stderr
