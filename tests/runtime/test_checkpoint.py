import pytest
import torch

from corral.errors import CheckpointError
from corral.runtime import checkpoint as ckpt


def test_save_keeps_only_the_newest(tmp_path):
    for i in range(1, 6):
        ckpt.save(tmp_path, i, {"x": torch.tensor([i])}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-000004.pt",
        "checkpoint-000005.pt",
    ]
    assert ckpt.load(ckpt.latest(tmp_path))["x"].item() == 5


def test_resolve_folder_and_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="holds no corral checkpoint"):
        ckpt.resolve(tmp_path)
    path = ckpt.save(tmp_path, 3, {}, keep=1)
    assert ckpt.resolve(tmp_path) == path


def test_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a corral checkpoint"):
        ckpt.load(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="no 'corral_checkpoint' key"):
        ckpt.load(plain)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    good = ckpt.save(tmp_path, 1, {"x": 1}, keep=3)
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        ckpt.save(tmp_path, 2, {"x": lambda: None}, keep=3)  # unpicklable: write fails
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
