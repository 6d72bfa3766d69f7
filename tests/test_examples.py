"""The README's demo keeps its promise: ≥ 96.5% test accuracy on digits, 2 and 4 workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from digits import main, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("strategy", ["allreduce", "averaging"])
def test_digits_reaches_the_promised_accuracy(tmp_path, strategy, workers):
    row = train(strategy, workers, epochs=30, checkpoint_dir=str(tmp_path))
    assert row["accuracy"] >= 0.965


def test_the_demo_prints_its_table(tmp_path, monkeypatch, capsys):
    argv = [
        "digits.py",
        "--strategy",
        "averaging",
        "--workers",
        "2",
        "--epochs",
        "2",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert "| averaging | 2 |" in capsys.readouterr().out


def test_the_service_example_job_is_a_valid_spec_whose_files_exist():
    from corral.spec import load_spec

    job = Path(__file__).parents[1] / "examples" / "digits_job" / "job.yaml"
    spec = load_spec(job)
    entry_file = spec.entrypoint.split(":")[0]
    assert (job.parent / entry_file).resolve().exists()
    assert spec.data.path == "train.parquet" and spec.validation is not None
