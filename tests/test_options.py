"""Every numeric or fixed-list option is checked once, where its stage's config is defined (stages/options.py):
a bad value is one line before any work starts, and writes nothing."""
import pytest

from tests.helpers import run_rae

CASES = [
    (["encode", "{d}", "--out", "{o}", "--preset", "demo", "--limit", "0"], "--limit must be at least 1"),
    (["encode", "{d}", "--out", "{o}", "--preset", "demo", "--limit", "-5"], "--limit must be at least 1"),
    (["encode", "{d}", "--out", "{o}", "--preset", "demo", "--image-size", "0"], "--image-size must be at least 16"),
    (["sample", "--model", "{d}", "--out", "{o}", "--per-class", "0"], "--per-class must be at least 1"),
    (["sample", "--model", "{d}", "--out", "{o}", "--number", "4", "--guidance", "cfg", "--cfg-scale", "nan"],
     "--cfg-scale must be a finite number"),
    (["train-diffusion", "--latents", "{d}", "--out", "{o}", "--num-heads", "7"], "--num-heads 7 must give a whole head"),
    (["train-diffusion", "--latents", "{d}", "--out", "{o}", "--lr", "inf"], "--lr must be a finite number"),
    (["train-decoder", "--latents", "{d}", "--out", "{o}", "--lr", "-1"], "--lr must be positive"),
    (["train-decoder", "--latents", "{d}", "--out", "{o}", "--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (["decode", "{d}", "--decoder", "{d}", "--out", "{o}", "--batch-size", "0"], "--batch-size must be at least 1"),
    # Words from a fixed list: the field's choices.
    (["decode", "{d}", "--decoder", "{d}", "--out", "{o}", "--precision", "fp16"],
     "--precision must be auto, bf16 or fp32 (got fp16)"),
    (["encode", "{d}", "--out", "{o}", "--preset", "demo", "--codec", "gzip"],
     "--codec must be blosc-lz4, blosc-zstd or none (got gzip)"),
    (["train-diffusion", "--latents", "{d}", "--out", "{o}", "--time-dist", "normal"],
     "--time-dist must be logit_normal or uniform (got normal)"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_numbers_are_one_line_before_any_work(tmp_path, argv, expected):
    (tmp_path / "d").mkdir()
    args = [a.format(d=tmp_path / "d", o=tmp_path / "o") for a in argv]
    proc = run_rae(*args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written
