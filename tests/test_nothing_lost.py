"""Nothing lost, nothing mixed, nothing hung: an output never replaces or sits inside an input,
one writer per output, inputs and finished runs that change afterwards are caught, and the
smaller user-facing refusals. Every stage runs through the real command line on the demo chain
at its smallest sizes (the arguments of tests/test_pipeline_chain.py, in tests/helpers.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stages.artifacts.manifest import read_manifest
from stages.artifacts.outputs import claim_writer, lock_path, overlap, release_writers
from tests.helpers import (DECODE_ARGS, DECODER_ARGS, DIFFUSION_ARGS, ENCODE_ARGS, REPO, SAMPLE_ARGS, THREADS,
                           run_rae, tree_snapshot)

pytestmark = pytest.mark.chain


@pytest.fixture(scope="module")
def chain(demo_images, tmp_path_factory):
    """A whole demo chain on disk: lat.zarr, dec, dit, s.zarr, img, and a copy of the images."""
    root = tmp_path_factory.mktemp("lost")
    images = root / "images"
    shutil.copytree(demo_images, images)
    run_rae("encode", images, "--out", root / "lat.zarr", *ENCODE_ARGS)
    run_rae("train-decoder", "--latents", root / "lat.zarr", "--out", root / "dec", *DECODER_ARGS)
    run_rae("train-diffusion", "--latents", root / "lat.zarr", "--out", root / "dit", *DIFFUSION_ARGS)
    run_rae("sample", "--model", root / "dit", "--out", root / "s.zarr", *SAMPLE_ARGS)
    run_rae("decode", root / "s.zarr", "--decoder", root / "dec", "--out", root / "img", *DECODE_ARGS)
    return root


def _refused(proc, *words):
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# ---- 1. an output that is, lies inside or holds an input --------------------------------------

def _overlapping_commands(c):
    """(argv, the input that must survive) for every stage, with --overwrite: out = input, out inside
    an input, out holding an input, and through a symlink."""
    link = c / "link_to_dit"
    if not link.exists():
        link.symlink_to(c / "dit")
    return [
        (["sample", "--model", c / "dit", "--out", c / "dit", *SAMPLE_ARGS], c / "dit"),
        (["sample", "--model", c / "dit", "--out", link, *SAMPLE_ARGS], c / "dit"),
        (["sample", "--model", c / "dit", "--out", c / "dit" / "s.zarr", *SAMPLE_ARGS], c / "dit"),
        (["sample", "--model", c / "dit", "--out", c / "dit" / ".." / "dit", *SAMPLE_ARGS], c / "dit"),
        (["decode", c / "s.zarr", "--decoder", c / "dec", "--out", c / "s.zarr", *DECODE_ARGS], c / "s.zarr"),
        (["decode", c / "s.zarr", "--decoder", c / "dec", "--out", c / "dec", *DECODE_ARGS], c / "dec"),
        (["encode", c / "images", "--out", c / "images" / "S.zarr", *ENCODE_ARGS], c / "images"),
        (["encode", c / "images", "--out", c / "images", *ENCODE_ARGS], c / "images"),
        (["train-diffusion", "--latents", c / "lat.zarr", "--out", c / "lat.zarr", *DIFFUSION_ARGS], c / "lat.zarr"),
        (["train-diffusion", "--latents", c / "lat.zarr", "--out", c, *DIFFUSION_ARGS], c / "lat.zarr"),
        (["train-decoder", "--latents", c / "lat.zarr", "--out", c / "lat.zarr" / "dec", *DECODER_ARGS], c / "lat.zarr"),
        # The decoder reads the store's source images too: they are an input.
        (["train-decoder", "--latents", c / "lat.zarr", "--out", c / "images" / "dec", *DECODER_ARGS], c / "images"),
        (["import", "stats", c / "dit" / "latent_stats.safetensors", "--out", c / "dit"], c / "dit"),
    ]


def test_an_output_over_an_input_is_refused_and_the_input_survives(chain):
    for argv, survivor in _overlapping_commands(chain):
        before = tree_snapshot(survivor)
        for extra in ([], ["--overwrite"]):
            err = _refused(run_rae(*argv, *extra, check=False), "input")
            assert "--overwrite" not in err, err  # never the hint that would delete the input
            assert tree_snapshot(survivor) == before, argv
    assert not list(chain.glob(".*.lock")) and not list((chain / "dit").glob(".*.lock"))
    # The inputs still work: the model samples again.
    run_rae("sample", "--model", chain / "dit", "--out", chain / "again.zarr", *SAMPLE_ARGS)


def test_overlap_by_inode_sees_bind_like_links_and_missing_outputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "ln").symlink_to(tmp_path / "a")
    assert overlap(tmp_path / "a", tmp_path / "ln") == "same"
    assert overlap(tmp_path / "ln" / "b" / "new.zarr", tmp_path / "a") == "inside"
    assert overlap(tmp_path, tmp_path / "ln" / "b") == "holds"
    assert overlap(tmp_path / "a" / "x" / ".." / "b", tmp_path / "a" / "b") == "same"
    assert overlap(tmp_path / "c", tmp_path / "a") is None
    assert overlap(tmp_path / "a2", tmp_path / "a") is None  # a name prefix is not a parent


# ---- 2. one writer per output ---------------------------------------------------------------

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from stages.artifacts.outputs import claim_writer
claim_writer({out!r})
print("held", flush=True)
time.sleep(120)
"""


def _hold(out):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO), out=str(out))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_owner(chain, tmp_path):
    holder = _hold(tmp_path / "s.zarr")
    try:
        err = _refused(run_rae("sample", "--model", chain / "dit", "--out", tmp_path / "s.zarr", *SAMPLE_ARGS,
                               check=False), "being written by another rae process", f"pid {holder.pid}")
        assert "--overwrite" not in err
        assert not (tmp_path / "s.zarr").exists() and not list(tmp_path.glob(".s.zarr.creating*"))
        _refused(run_rae("train-diffusion", "--latents", chain / "lat.zarr", "--out", tmp_path / "s.zarr",
                         *DIFFUSION_ARGS, "--overwrite", check=False), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is taken over with a note, and the run completes.
    proc = run_rae("sample", "--model", chain / "dit", "--out", tmp_path / "s.zarr", *SAMPLE_ARGS)
    assert f"pid {holder.pid}" in proc.stderr and "taking it over" in proc.stderr
    assert read_manifest(tmp_path / "s.zarr")["complete"]
    assert not lock_path(tmp_path / "s.zarr").exists()  # released at the end


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    claim_writer(tmp_path / "x")
    claim_writer(tmp_path / "x")
    assert json.loads(lock_path(tmp_path / "x").read_text())["pid"] == os.getpid()
    release_writers()
    assert not lock_path(tmp_path / "x").exists()


def test_two_simultaneous_encodes_never_mix(demo_images, tmp_path):
    """Two processes started together on one --out: one writes the store, the other is refused in
    one line or finds it complete; the store equals a single run's."""
    argv = [sys.executable, "-m", "rae_cli.main", "encode", str(demo_images), "--out", str(tmp_path / "c.zarr"),
            *map(str, ENCODE_ARGS)]
    env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outs
    for code, (_, err) in zip(codes, outs):
        if code:
            assert "being written by another rae process" in err and "Traceback" not in err, err
    run_rae("encode", demo_images, "--out", tmp_path / "one.zarr", *ENCODE_ARGS)
    assert read_manifest(tmp_path / "c.zarr")["content_id"] == read_manifest(tmp_path / "one.zarr")["content_id"]
    assert not list(tmp_path.glob(".c.zarr*"))


def test_a_store_left_broken_is_repaired_by_overwrite(demo_images, tmp_path):
    out = tmp_path / "c.zarr"
    run_rae("encode", demo_images, "--out", out, *ENCODE_ARGS)
    manifest = read_manifest(out)
    manifest["complete"] = False
    for p in out.iterdir():  # what two racing writers of an earlier rae left: the manifest alone
        shutil.rmtree(p) if p.is_dir() else (p.unlink() if p.name != "manifest.json" else None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    _refused(run_rae("encode", demo_images, "--out", out, *ENCODE_ARGS, check=False), "damaged", "--overwrite")
    run_rae("encode", demo_images, "--out", out, *ENCODE_ARGS, "--overwrite")
    assert read_manifest(out)["content_id"] == manifest["content_id"]


# ---- 4. inputs that change under a run --------------------------------------------------------

def test_train_decoder_refuses_changed_or_deleted_source_images(chain, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(chain / "images", images)
    run_rae("encode", images, "--out", tmp_path / "lat.zarr", *ENCODE_ARGS)
    first = sorted(images.rglob("*.png"))[3]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # touched: new time
    err = _refused(run_rae("train-decoder", "--latents", tmp_path / "lat.zarr", "--out", tmp_path / "dec",
                           *DECODER_ARGS, check=False), first.name, "changed")
    assert not (tmp_path / "dec" / "decoder_ema.safetensors").exists(), err
    first.unlink()
    _refused(run_rae("train-decoder", "--latents", tmp_path / "lat.zarr", "--out", tmp_path / "dec",
                     *DECODER_ARGS, check=False), first.name)


def test_a_run_whose_files_changed_is_refused_and_shown(chain, tmp_path):
    run = tmp_path / "dit"
    shutil.copytree(chain / "dit", run)
    config = json.loads((run / "config.json").read_text())
    config["flow"]["shift"] = 9.0
    (run / "config.json").write_text(json.dumps(config))
    _refused(run_rae("sample", "--model", run, "--out", tmp_path / "s.zarr", *SAMPLE_ARGS, check=False),
             "config.json", "changed after rae wrote it")
    assert "changed since written: config.json" in run_rae("info", run).stdout
    assert "as written" in run_rae("info", chain / "dit").stdout
    run_rae("info", chain / "img")  # an image folder's manifest lists its first and last PNG under "files"
    # Swapped weights (the raw model's in the EMA's place), and the decoder's the same way.
    shutil.copy(chain / "dit" / "config.json", run / "config.json")
    shutil.copy(run / "model.safetensors", run / "model_ema.safetensors")
    _refused(run_rae("sample", "--model", run, "--out", tmp_path / "s.zarr", *SAMPLE_ARGS, check=False),
             "model_ema.safetensors")
    dec = tmp_path / "dec"
    shutil.copytree(chain / "dec", dec)
    shutil.copy(dec / "decoder.safetensors", dec / "decoder_ema.safetensors")
    _refused(run_rae("decode", chain / "s.zarr", "--decoder", dec, "--out", tmp_path / "img", *DECODE_ARGS,
                     check=False), "decoder_ema.safetensors")
    # A copy with new times but the same bytes is the same run.
    shutil.copytree(chain / "dit", tmp_path / "copy", copy_function=shutil.copy)
    run_rae("sample", "--model", tmp_path / "copy", "--out", tmp_path / "s2.zarr", *SAMPLE_ARGS)


# ---- 6. the smaller ones ----------------------------------------------------------------------

def test_a_store_with_a_hand_edited_labels_array_is_one_line(chain, tmp_path):
    import zarr

    store = tmp_path / "lat.zarr"
    shutil.copytree(chain / "lat.zarr", store)
    group = zarr.open_group(str(store), mode="r+")
    labels = np.asarray(group["labels"][:])
    del group["labels"]
    group.create_array("labels", shape=(len(labels) - 3,), dtype=labels.dtype)
    _refused(run_rae("train-diffusion", "--latents", store, "--out", tmp_path / "dit", *DIFFUSION_ARGS,
                     check=False), "labels", "damaged")


def test_sigterm_ends_a_stage_with_the_resume_line(chain, tmp_path):
    argv = [sys.executable, "-m", "rae_cli.main", "train-diffusion", "--latents", str(chain / "lat.zarr"), "--out",
            str(tmp_path / "dit"), *map(str, DIFFUSION_ARGS), "--steps", "100000", "--checkpoint-every", "100000"]
    env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "dit" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): run the same command again to resume" in err and "Traceback" not in err, err
    assert not lock_path(tmp_path / "dit").exists()


def test_sigterm_to_the_whole_process_group_is_the_same_one_line(chain, tmp_path):
    # A scheduler's time limit, `timeout` and `kill -- -PGID` stop every process of the job: the data-loading
    # workers die of the same SIGTERM, and torch raises "DataLoader worker ... killed by signal: Terminated"
    # while the stage unwinds. That is the one stop, not a second error with a traceback (seen on the GPU).
    out = tmp_path / "dec"
    argv = [sys.executable, "-m", "rae_cli.main", "train-decoder", "--latents", str(chain / "lat.zarr"), "--out",
            str(out), *map(str, DECODER_ARGS), "--steps", "100000", "--checkpoint-every", "100000",
            "--preview-every", "100000", "--num-workers", "2"]
    env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps on: the workers are reading
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): run the same command again to resume" in err and "Traceback" not in err, err
    assert not lock_path(out).exists()


def test_a_stop_raised_again_while_unwinding_is_still_the_stop(capsys):
    import typer

    from rae_cli.common import Terminated, stopped_by, user_errors

    def worker_died(signal_name):
        return RuntimeError(f"DataLoader worker (pid 1034) is killed by signal: {signal_name}. ")

    def chained(first, then):
        try:
            try:
                raise first
            except BaseException:
                raise then
        except BaseException as e:
            return e

    assert isinstance(stopped_by(chained(Terminated(), worker_died("Terminated"))), Terminated)
    assert isinstance(stopped_by(chained(KeyboardInterrupt(), ValueError("in a finally"))), KeyboardInterrupt)
    assert isinstance(stopped_by(worker_died("Terminated")), Terminated)  # the worker's SIGCHLD came first
    assert stopped_by(worker_died("Killed")) is None and stopped_by(ValueError("x")) is None

    def raising(e):
        return user_errors(lambda: (_ for _ in ()).throw(e))

    child_handler = signal.getsignal(signal.SIGCHLD)  # a stop resets it (the stage is exiting): put it back
    try:
        with pytest.raises(SystemExit) as stop:
            raising(chained(Terminated(), worker_died("Terminated")))()
    finally:
        signal.signal(signal.SIGCHLD, child_handler)
    assert stop.value.code == 143
    assert "terminated (SIGTERM): run the same command again to resume" in capsys.readouterr().err
    # A worker killed alone (the out-of-memory killer's SIGKILL) is an error of one line, not a traceback.
    with pytest.raises(typer.Exit) as failed:
        raising(worker_died("Killed"))()
    assert failed.value.exit_code == 1
    err = capsys.readouterr().err
    assert "a data-loading worker was killed (signal Killed" in err and "--num-workers" in err
    with pytest.raises(ValueError):  # anything else goes on up as before
        raising(ValueError("a bug"))()


def test_train_diffusion_names_the_option_that_differs(chain, tmp_path):
    out = tmp_path / "dit"
    shutil.copytree(chain / "dit", out)
    err = _refused(run_rae("train-diffusion", "--latents", chain / "lat.zarr", "--out", out, *DIFFUSION_ARGS,
                           "--lr", "0.0003", check=False), "--lr", "0.0003 here", "--overwrite")
    assert "--seed" not in err
