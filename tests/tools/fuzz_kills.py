"""Kill every stage of the demo chain at every write, run it again, and check it ends as an
uninterrupted run; then damage every shard of a store in every way and check that reading it is
one line naming the file; then point every stage's output at each of its inputs, start two writers
of every stage's output at once, and change inputs after they were made. Not part of `make test`
(several minutes): `make fuzz`, or `python tests/tools/fuzz_kills.py [--stride N]` (every N-th write only).

A "write" is a commit of a file: every atomic write of rae ends in ``os.replace`` (manifests,
shards, checkpoints, weights, PNGs, the .npz, staging folders renamed into place), so the kill is
a KeyboardInterrupt raised instead of the k-th ``os.replace`` of the stage, for every k (Zarr's
own small writes, on its event loop's threads, are left alone: in-process, an exception there
would stop that loop for good). The stages
run in this process through the real command line (the Typer app), on the demo preset at tiny
sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAE_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tests.helpers import REPO, Killer, chain_stages, fingerprint, run_rae, tree_snapshot  # noqa: E402


def kill_everywhere(root: Path, images: Path, stride: int) -> list[str]:
    rows = []
    for name, argv, what in chain_stages(root, images):
        ref = {"encode": "lat.zarr", "train-decoder": "dec", "train-diffusion": "dit", "sample": "s.zarr",
               "decode": "img"}[name]
        with Killer(None) as count:
            run_rae(*argv(root / "ref" / ref))
        expected, n = fingerprint(root / "ref" / ref, what), count.calls
        t0, bad = time.time(), []
        for k in range(1, n + 1, stride):
            out = root / f"{name}-{k}"
            with Killer(k):
                proc = run_rae(*argv(out), check=False)
            if proc.returncode == 0:  # the k-th write did not happen in this run (fewer writes): nothing to resume
                pass
            again = run_rae(*argv(out), check=False)
            try:
                assert again.returncode == 0, again.stderr.strip().splitlines()[-1:] or again.stdout[-300:]
                assert fingerprint(out, what) == expected, "differs from the uninterrupted run"
            except AssertionError as e:
                bad.append(f"kill at write {k}: {e}")
            shutil.rmtree(out, ignore_errors=True)
        rows.append(f"| {name} | {n} | {len(range(1, n + 1, stride))} | {len(bad)} | {time.time() - t0:.0f} s |")
        for line in bad[:5]:
            print(f"  {name}: {line}", flush=True)
    return rows


def damage_every_shard(store: Path) -> list[str]:
    from stages.errors import ArtifactError
    from stages.artifacts.store import LatentStore

    rows, shards = [], sorted((store / "latents" / "c").rglob("[0-9]*"))
    shards = [p for p in shards if p.is_file()]
    rng = np.random.default_rng(0)
    for damage in ("missing", "random bytes", "truncated", "index bytes flipped", "empty", "entry bit flipped"):
        failures = 0
        for shard in shards:
            raw = shard.read_bytes()
            if damage == "missing":
                shard.unlink()
            elif damage == "random bytes":
                shard.write_bytes(rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes())
            elif damage == "truncated":
                shard.write_bytes(raw[: len(raw) // 3])
            elif damage == "empty":
                shard.write_bytes(b"")
            elif damage == "entry bit flipped":  # one bit in the middle of the first entry's bytes
                data = bytearray(raw)
                data[int(np.frombuffer(raw[-4 - 16 * 8: -4], dtype="<u8")[1]) // 2] ^= 0x01
                shard.write_bytes(bytes(data))
            else:
                data = bytearray(raw)
                for pos in rng.choice(np.arange(len(raw) - 4 - 16 * 8, len(raw) - 4), 40, replace=False):
                    data[pos] ^= 0xFF
                shard.write_bytes(bytes(data))
            try:
                LatentStore(store).read(np.arange(LatentStore(store).n))
                failures += 1  # read without noticing
            except ArtifactError as e:
                failures += int("\n" in str(e) or str(shard) not in str(e))
            shard.write_bytes(raw)
        rows.append(f"| {damage} | {len(shards)} | {failures} |")
    return rows


def _one_line(proc, *words) -> bool:
    err = proc.stderr.strip()
    return proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1 and all(w in err for w in words)


def overlapping_outputs(root: Path, images: Path) -> list[str]:
    """Every stage with its output at each of its inputs: the same path, a symlink to it, a folder
    inside it and its parent folder, each with and without --overwrite. Each must be refused in one
    line that never suggests --overwrite, and the input must be untouched."""
    ref = root / "ref"
    inputs = {"encode": [images], "train-decoder": [ref / "lat.zarr", images], "train-diffusion": [ref / "lat.zarr"],
              "sample": [ref / "dit"], "decode": [ref / "s.zarr", ref / "dec"]}
    rows = []
    for name, argv, _ in chain_stages(root, images):
        tries = bad = 0
        for inp in inputs[name]:
            link = root / f"link-{name}-{inp.name}"
            if not link.exists():
                link.symlink_to(inp)
            for out in (inp, link, inp / "new_output", inp.parent):
                for extra in ([], ["--overwrite"]):
                    before = tree_snapshot(inp)
                    proc = run_rae(*argv(out), *extra, check=False)
                    tries += 1
                    ok = _one_line(proc, "input") and "--overwrite" not in proc.stderr and tree_snapshot(inp) == before
                    if not ok:
                        bad += 1
                        print(f"  {name} --out {out} {' '.join(extra)}: {proc.returncode} {proc.stderr.strip()[-300:]}")
        rows.append(f"| {name} | {tries} | {bad} |")
    return rows


def concurrent_writers(root: Path, images: Path, rounds: int) -> list[str]:
    """Two processes of every stage started together on one output, ``rounds`` times: at least one
    finishes, a refused one says so in one line naming the owner, and the output equals an
    uninterrupted run's with no staging folder or lock left (and no step logged twice)."""
    import subprocess

    rows = []
    for name, argv, what in chain_stages(root, images):
        ref = {"encode": "lat.zarr", "train-decoder": "dec", "train-diffusion": "dit", "sample": "s.zarr",
               "decode": "img"}[name]
        expected, bad, refused = fingerprint(root / "ref" / ref, what), 0, 0
        for r in range(rounds):
            out = root / f"race-{name}-{r}"
            cmd = [sys.executable, "-m", "rae_cli.main", *map(str, argv(out))]
            env = {**os.environ, "RAE_NO_PROGRESS": "1"}
            procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [(p, *p.communicate(timeout=900)) for p in procs]
            problems = []
            if all(p.returncode for p, _, _ in results):
                problems.append("neither writer finished")
            for p, _, err in results:
                if p.returncode:
                    refused += 1
                    if not ("being written by another rae process" in err and len(err.strip().splitlines()) == 1):
                        problems.append(f"refusal not one line: {err.strip()[-300:]}")
            if not problems:
                try:
                    if fingerprint(out, what) != expected:
                        problems.append("differs from the uninterrupted run")
                except AssertionError as e:
                    problems.append(str(e))
                leftovers = [p.name for p in root.glob(f".race-{name}-{r}*")]
                if leftovers:
                    problems.append(f"left {leftovers}")
                log = out / "metrics.jsonl"
                if log.is_file():
                    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
                    if len(steps) != len(set(steps)):
                        problems.append("a step logged twice")
            bad += bool(problems)
            for line in problems:
                print(f"  {name} round {r}: {line}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(f"| {name} | {rounds} | {refused} | {bad} |")
    return rows


def changed_inputs(root: Path, images: Path) -> list[str]:
    """Inputs changed after they were made: each use must be refused in one line naming the file."""
    ref = root / "ref"
    work = root / "changed"
    shutil.copytree(ref, work)
    copy_images = root / "changed-images"
    shutil.copytree(images, copy_images)
    lat = root / "changed-lat.zarr"
    run_rae("encode", copy_images, "--out", lat, "--preset", "demo", "--flip", "--block-size", 16, "--shard-size", 8,
            "--num-workers", 0)
    source = sorted(copy_images.rglob("*.png"))[1]
    rows = []

    def case(what, change, argv, words):
        change()
        proc = run_rae(*argv, check=False)
        rows.append(f"| {what} | {'yes' if _one_line(proc, *words) else 'NO: ' + proc.stderr.strip()[-200:]} |")

    dec_args = ["train-decoder", "--latents", lat, "--out", root / "changed-dec", "--preset", "demo", "--steps", 2,
                "--batch-size", 8, "--num-workers", 0]
    case("source image touched (new modification time)",
         lambda: os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9)),
         dec_args, [source.name])
    case("source image replaced (other size)", lambda: source.write_bytes(source.read_bytes() + b"\0"), dec_args,
         [source.name])
    case("source image deleted", lambda: source.unlink(), dec_args, [source.name])
    sample = ["sample", "--model", work / "dit", "--out", root / "changed-s.zarr", "--preset", "demo", "--per-class", 2,
              "--steps", 2]
    config = work / "dit" / "config.json"
    original = config.read_text()
    case("diffusion config.json edited", lambda: config.write_text(original.replace('"shift"', '"shift" ', 1)),
         sample, ["config.json"])
    config.write_text(original)
    case("diffusion EMA weights swapped for the raw ones",
         lambda: shutil.copy(work / "dit" / "model.safetensors", work / "dit" / "model_ema.safetensors"),
         sample, ["model_ema.safetensors"])
    case("decoder EMA weights swapped for the raw ones",
         lambda: shutil.copy(work / "dec" / "decoder.safetensors", work / "dec" / "decoder_ema.safetensors"),
         ["decode", ref / "s.zarr", "--decoder", work / "dec", "--out", root / "changed-img"], ["decoder_ema.safetensors"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=1, help="kill at every N-th write only")
    ap.add_argument("--races", type=int, default=3, help="rounds of two simultaneous writers per stage")
    args = ap.parse_args()
    from stages.demo.data import generate

    root = Path(tempfile.mkdtemp(prefix="rae-fuzz-"))
    images = generate(root / "images", per_class=2, size=64, seed=0)
    (root / "ref").mkdir()
    kills = kill_everywhere(root, images, args.stride)
    shards = damage_every_shard(root / "ref" / "lat.zarr")
    overlaps = overlapping_outputs(root, images)
    races = concurrent_writers(root, images, args.races)
    changes = changed_inputs(root, images)
    for title, columns, rows in (
            ("Killed at every write, then run again (demo preset): must end as the uninterrupted run",
             ("stage", "writes", "kills", "runs that did not end identical", "time"), kills),
            ("Every shard damaged: reading the store must be one line naming the file",
             ("damage", "shards", "reads that were silent or not one line"), shards),
            ("Output at an input (same, symlink, inside, parent; with and without --overwrite): refused, input intact",
             ("stage", "tries", "not refused cleanly or input touched"), overlaps),
            ("Two writers started together on one output",
             ("stage", "rounds", "writers refused", "rounds with a problem"), races),
            ("Inputs changed after they were made: refused in one line naming the file", ("change", "refused"),
             changes)):
        print(f"\n## {title}\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
        print("\n".join(rows))
    failed = (sum(int(r.split("|")[4]) for r in kills) + sum(int(r.split("|")[3]) for r in shards)
              + sum(int(r.split("|")[3]) for r in overlaps) + sum(int(r.split("|")[4]) for r in races)
              + sum("NO" in r for r in changes))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
