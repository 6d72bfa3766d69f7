"""The job page's pure drawing helpers: the loss chart's log scale, the validation accuracy
chart's fixed range, and log lines shown as text. (The browser tests in test_ui.py show
them on a real job.)"""

from __future__ import annotations

from corral.service.ui import chart, log_text, panel


def _rows(key: str, values: list[float]) -> list[dict[str, object]]:
    return [{"time": float(t), "kind": "epoch", key: v} for t, v in enumerate(values)]


def _heights(path: str) -> list[float]:
    return [float(point.split(",")[1]) for point in path[1:].replace("L", " ").split()]


def test_loss_is_drawn_on_a_log_scale_first_then_linear() -> None:
    drawn = panel(_rows("loss", [1.0, 0.1, 0.01]), "loss", "loss", log=True)
    assert drawn is not None
    log, linear = drawn.drawings
    assert (log.scale, linear.scale) == ("log", "linear")
    a, b, c = _heights(log.path)
    assert round(b - a, 1) == round(c - b, 1) > 0  # each decade one equal step down
    a, b, c = _heights(linear.path)
    assert b - a > 5 * (c - b)  # linear: the last step is nearly flat
    assert [text for _, text in log.y_labels] == ["1", "0.1", "0.01"]


def test_a_loss_that_reaches_zero_has_only_a_linear_scale() -> None:
    drawn = panel(_rows("loss", [0.5, 0.0]), "loss", "loss", log=True)
    assert drawn is not None and [d.scale for d in drawn.drawings] == ["linear"]


def test_validation_accuracy_spans_zero_to_one() -> None:
    panels = {p.key: p for p in chart(_rows("val_accuracy", [0.6, 0.9]))}
    (only,) = panels["val_accuracy"].drawings
    assert [text for _, text in only.y_labels] == ["1", "0.5", "0"]
    assert "loss" not in panels  # no row has it


def test_a_log_line_of_json_metrics_reads_as_text() -> None:
    assert log_text('done: {"loss": 0.123456, "accuracy": 0.9, "epoch": 2}') == (
        "done: loss=0.1235 accuracy=0.9"
    )
    for kept in ("epoch 1/2 loss=0.5", "done: {not json}", 'done: ["a list"]'):
        assert log_text(kept) == kept
