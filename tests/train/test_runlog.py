import json

import pytest
from PIL import Image

from stages.errors import ArtifactError
from stages.train.runlog import append_metrics, plot_metrics, read_metrics, truncate_metrics, wants_log_axis


def test_metrics_log_with_a_torn_last_line_reads_and_a_corrupt_middle_is_one_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.3}\n')
    with pytest.raises(ArtifactError, match="line 2") as info:
        read_metrics(tmp_path)
    assert "\n" not in str(info.value)
    assert read_metrics(tmp_path / "fresh") == []


def test_a_resume_cuts_the_log_back_to_its_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in truncate_metrics(tmp_path, 2)] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert truncate_metrics(tmp_path / "fresh", 0) == [] and not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_the_plot_has_a_panel_per_logged_key_and_waits_for_a_record(tmp_path):
    titles = {"l1": "l1", "gan": "gan", "lr": "lr"}
    plot_metrics([], tmp_path / "none.png", titles)
    assert not (tmp_path / "none.png").exists()
    records = [{"step": s, "l1": 1.0 / s, "lr": 1e-4} for s in range(1, 6)] + [{"step": 6, "l1": float("nan")}]
    plot_metrics(records, tmp_path / "losses.png", titles, panel=(360, 180), cols=2)
    assert Image.open(tmp_path / "losses.png").size == (720, 180)  # "gan" was never logged: two panels
    plot_metrics(records[:1], tmp_path / "one.png", {"l1": "training loss"}, panel=(720, 420), cols=1)
    assert Image.open(tmp_path / "one.png").size == (720, 420)


def test_the_smoothed_line_is_a_centred_mean_without_lag():
    from stages.train.runlog import centred_mean

    pts = [(s, 10.0 - s) for s in range(200)]  # a straight falling loss: a centred mean is the line itself
    assert centred_mean(pts, 2)[2:-2] == pts[2:-2]
    assert centred_mean(pts, 2)[0] == (0, (10 + 9 + 8) / 3)  # the window shrinks at the ends
    noisy = [(s, (-1.0) ** s) for s in range(200)]
    assert all(abs(v) <= 1 / 5 for _, v in centred_mean(noisy, 2)[2:-2])  # alternating noise averages out


def test_a_loss_spanning_decades_gets_a_log_axis():
    assert wants_log_axis([5.0, 1.0, 0.1, 0.01])
    assert not wants_log_axis([2.3, 1.1, 0.5])  # within a decade and a half: linear reads better
    assert not wants_log_axis([0.0, 1.0]) and not wants_log_axis([-1.0, 100.0])  # zero or negative: linear
