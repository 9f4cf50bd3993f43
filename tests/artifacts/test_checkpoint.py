import numpy as np
import pytest
import torch

from stages.artifacts.checkpoint import checkpoints, load_latest, load_state, save_checkpoint, save_state
from stages.errors import ArtifactError


def test_nested_training_state_round_trips(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7, "pos": (3, 5),
             "arr": np.arange(5), "name": "x", "none": None}
    save_state(tmp_path / "c.safetensors", state)
    back = load_state(tmp_path / "c.safetensors")
    assert back["step"] == 7 and back["pos"] == (3, 5) and back["name"] == "x" and back["none"] is None
    np.testing.assert_array_equal(back["arr"], np.arange(5))
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])  # integer parameter ids survive as integers
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_newest_checkpoint_and_rotation(tmp_path):
    for step in (10, 20, 9, 30):  # the newest is the highest step, whatever the order of writes or names
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=3)
    assert [p.name for p in checkpoints(tmp_path)][0] == "step_00000030.safetensors"
    assert load_latest(tmp_path)[1]["w"][0] == 30
    assert not (tmp_path / "checkpoints" / "latest").exists()  # no pointer file: the files are the truth
    save_checkpoint(tmp_path, 40, {"w": torch.full((2,), 40.0)}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000030.safetensors", "step_00000040.safetensors"]


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    save_state(tmp_path / "c.safetensors", {"w": torch.ones(1000)})
    raw = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError) as e:
        load_state(tmp_path / "c.safetensors")
    assert "\n" not in str(e.value)


def test_resume_skips_an_unreadable_newest_checkpoint_and_says_so(tmp_path):
    from stages.artifacts.checkpoint import resume_state

    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    newest = tmp_path / "checkpoints" / "step_00000020.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])  # cut short
    said = []
    path, state = resume_state(tmp_path, say=said.append)
    assert path.name == "step_00000010.safetensors" and state["step"] == 10
    assert len(said) == 1 and "step_00000020" in said[0] and "\n" not in said[0]
    (tmp_path / "checkpoints" / "step_00000010.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="no readable checkpoint"):
        resume_state(tmp_path)
    assert resume_state(tmp_path / "fresh") is None
