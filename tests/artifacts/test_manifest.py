import pytest

from stages.errors import ArtifactError
from stages.artifacts.manifest import claim_output, new_manifest, resume_if_same, write_manifest


def _artifact(path, identity="a", complete=False):
    path.mkdir(parents=True)
    write_manifest(path, {**new_manifest("latent-store", {}, identity=identity), "complete": complete})
    (path / "data").write_text("...")
    return path


def _claim(out, overwrite=False, identity="a"):
    return claim_output(out, overwrite, resume_if_same("latent-store", identity), different="another store",
                        foreign="not a store")


def test_the_same_artifact_is_resumed_or_done(tmp_path):
    assert _claim(_artifact(tmp_path / "s")) == "resume"
    assert _claim(_artifact(tmp_path / "t", complete=True)) == "done"
    assert (tmp_path / "t" / "data").exists()


def test_another_artifact_is_replaced_only_with_overwrite(tmp_path):
    out = _artifact(tmp_path / "s")
    with pytest.raises(ArtifactError, match="another store"):
        _claim(out, identity="b")
    assert _claim(out, overwrite=True, identity="b") is None and not out.exists()
    # "replace": an interrupted artifact the stage may redo without --overwrite (rae import's).
    out = _artifact(tmp_path / "i")
    assert claim_output(out, False, lambda old: "replace", different="", foreign="") is None and not out.exists()


def test_a_folder_that_is_not_a_rae_artifact_is_never_touched(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not a store"):
            _claim(other, overwrite=overwrite)
    assert (other / "thesis.tex").exists()
    (tmp_path / "empty").mkdir()
    assert _claim(tmp_path / "empty") is None and _claim(tmp_path / "absent") is None
