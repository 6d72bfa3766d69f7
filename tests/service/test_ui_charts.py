"""The UI's pure drawing helpers: the job page's loss chart's log scale, the validation
accuracy chart's fixed range, and log lines shown as text; the search page's axes
(linear, log, categorical), its epoch chart, importance bars and parallel coordinates.
(The browser tests in test_ui.py and test_ui_search.py show them on real pages.)"""

from __future__ import annotations

import pytest

from corral.service.models import TrialOut
from corral.service.ui import (
    categorical_axis,
    chart,
    epoch_chart,
    importance_bars,
    linear_axis,
    log_axis,
    log_text,
    nice_ticks,
    panel,
    parallel_coordinates,
    param_axis,
    value_colour,
)


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


# -- the search page's pictures


def _trial(number: int, state: str, history: list[float], **params: object) -> TrialOut:
    value = history[-1] if history else None
    return TrialOut(
        number=number,
        state=state,
        params=params,
        value=value,
        epochs=len(history),
        history=history,
        job=None,
        reason="",
    )


def test_a_linear_axis_maps_its_ends_and_a_flat_range_draws_midway() -> None:
    axis = linear_axis(0.0, 10.0, 100.0, 0.0)  # y grows down: 0 at the bottom
    assert (axis.at(0.0), axis.at(5.0), axis.at(10.0)) == (100.0, 50.0, 0.0)
    assert axis.at(float("inf")) is None and axis.at("x") is None and axis.at(True) is None
    assert [text for _, text in axis.ticks()] == ["0", "2.5", "5", "7.5", "10"]
    flat = linear_axis(3.0, 3.0, 100.0, 0.0)
    assert flat.at(3.0) == 50.0


def test_nice_ticks_are_round_and_whole_for_an_int_range() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.213, 0.927) == [0.4, 0.6, 0.8]
    assert nice_ticks(1, 3, integer=True) == [1.0, 2.0, 3.0]
    assert all(v == int(v) for v in nice_ticks(16, 128, integer=True))


def test_a_log_axis_gives_each_decade_the_same_length() -> None:
    axis = log_axis(0.001, 0.1, 0.0, 200.0)
    assert (axis.at(0.001), axis.at(0.01), axis.at(0.1)) == (0.0, 100.0, 200.0)
    assert axis.at(0.0) is None and axis.at(-1.0) is None
    assert [text for _, text in axis.ticks()] == ["0.001", "0.01", "0.1"]
    narrow = log_axis(2.0, 5.0, 0.0, 100.0)  # less than a decade: its two ends
    assert [text for _, text in narrow.ticks()] == ["2", "5"]
    with pytest.raises(ValueError):
        log_axis(0.0, 1.0, 0.0, 1.0)


def test_a_categorical_axis_spaces_the_choices_evenly() -> None:
    axis = categorical_axis([16, 32, 64, True], 0.0, 300.0)
    assert [axis.at(c) for c in (16, 32, 64, True)] == [0.0, 100.0, 200.0, 300.0]
    assert axis.at(48) is None
    assert axis.at(1) is None  # 1 is not the choice True
    assert [text for _, text in axis.ticks()] == ["16", "32", "64", "true"]
    assert categorical_axis(["only"], 0.0, 100.0).at("only") == 50.0


def test_param_axis_follows_the_space() -> None:
    assert param_axis({"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, 0, 1).kind == "log"
    assert param_axis({"type": "categorical", "choices": ["a", "b"]}, 0, 1).kind == "categorical"
    ints = param_axis({"type": "int", "low": 1, "high": 7, "log": False}, 0, 1)
    assert (ints.kind, ints.integer) == ("linear", True)


def test_the_epoch_chart_has_a_line_per_trial_the_pruned_shorter_the_best_last() -> None:
    trials = [
        _trial(0, "complete", [0.5, 0.7, 0.9]),
        _trial(1, "pruned", [0.2]),
        _trial(2, "complete", [0.6, 0.65, 0.7]),
        _trial(3, "running", []),  # nothing reported: no line
        _trial(4, "fail", [0.4, float("-inf")]),  # a NaN report: left out
    ]
    drawn = epoch_chart(trials, "accuracy", best=0)
    assert drawn is not None
    assert [line.number for line in drawn.lines] == [1, 2, 4, 0]
    by = {line.number: line for line in drawn.lines}
    assert by[0].best and not by[2].best
    assert by[0].path.count("L") == 2 and by[1].path.count("L") == 0
    assert by[1].end[0] < by[0].end[0]  # it stopped at epoch 1 of 3
    assert by[4].path.count("M") == 1 and "L" not in by[4].path
    assert [text for _, text in drawn.x_ticks] == ["1", "2", "3"]
    assert "trial 1 · pruned · accuracy 0.2 after 1 epoch" in by[1].title
    assert epoch_chart([_trial(0, "running", [])], "accuracy", None) is None


def test_importance_bars_put_the_largest_first_and_scale_to_it() -> None:
    drawn = importance_bars({"batch_size": 0.2, "optimizer.lr": 0.795, "seed": 0.005})
    assert drawn is not None
    assert [b.label for b in drawn.bars] == ["optimizer.lr", "batch_size", "seed"]
    lr, bs, seed = drawn.bars
    assert abs(bs.width / lr.width - 0.2 / 0.795) < 0.01
    assert (lr.text, bs.text, seed.text) == ("80%", "20%", "<1%")
    assert lr.y < bs.y < seed.y
    assert importance_bars({}) is None


SPACE = {
    "optimizer.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "momentum": {"type": "float", "low": 0.0, "high": 0.9, "log": False},
}


def test_parallel_coordinates_draw_each_ended_trial_across_the_axes() -> None:
    trials = [
        _trial(0, "complete", [0.9], **{"optimizer.lr": 0.01, "batch_size": 32, "momentum": 0.5}),
        _trial(1, "pruned", [0.3], **{"optimizer.lr": 0.001, "batch_size": 16, "momentum": 0.0}),
        _trial(2, "fail", [0.5], **{"optimizer.lr": 0.1, "batch_size": 64, "momentum": 0.9}),
        _trial(3, "complete", [0.6], **{"optimizer.lr": 0.1, "batch_size": 64}),  # no momentum
    ]
    drawn = parallel_coordinates(SPACE, trials, "accuracy", "max", best=0)
    assert drawn is not None
    assert [a.label for a in drawn.axes] == ["lr", "batch_size", "momentum", "accuracy"]
    assert [a.note for a in drawn.axes] == ["log scale", "by choice", "", "higher is better"]
    by = {line.number: line for line in drawn.lines}
    assert sorted(by) == [0, 1, 3]  # a failed trial has no value to draw
    assert drawn.lines[-1].number == 0 and by[0].best  # the best on top

    def heights(points: str) -> list[float]:
        return [float(p.split(",")[1]) for p in points.split()]

    lr0, bs0, _, _ = heights(by[0].points)
    lr1, bs1, _, _ = heights(by[1].points)
    assert lr0 == (drawn.top + drawn.bottom) / 2  # 0.01: midway on the 0.001–0.1 log axis
    assert (lr1, bs1) == (drawn.bottom, drawn.bottom)  # the low ends at the bottom
    assert bs0 == (drawn.top + drawn.bottom) / 2  # 32: the middle of three choices
    assert len(by[3].points.split()) == 3  # it skips the axis it has no value on
    assert (drawn.worst, drawn.best) == ("0.3", "0.9")
    assert by[0].colour == value_colour(1.0) and by[1].colour == value_colour(0.0)


def test_parallel_coordinates_colour_the_lowest_best_when_minimising() -> None:
    trials = [
        _trial(0, "complete", [0.2], **{"optimizer.lr": 0.01}),
        _trial(1, "complete", [0.8], **{"optimizer.lr": 0.02}),
    ]
    drawn = parallel_coordinates(SPACE, trials, "loss", "min", best=0)
    assert drawn is not None
    by = {line.number: line for line in drawn.lines}
    assert by[0].colour == value_colour(1.0) and by[1].colour == value_colour(0.0)
    assert drawn.axes[-1].note == "lower is better"
    assert parallel_coordinates(SPACE, [_trial(0, "running", [])], "loss", "min", None) is None


def test_the_value_ramp_runs_from_pale_to_dark() -> None:
    def lightness(colour: str) -> int:
        return sum(int(colour[i : i + 2], 16) for i in (1, 3, 5))

    steps = [value_colour(f / 4) for f in range(5)]
    assert steps[0] == "#b5de2b" and steps[-1] == "#440154"
    assert lightness(steps[0]) > lightness(steps[2]) > lightness(steps[-1])
    assert value_colour(-1.0) == steps[0] and value_colour(2.0) == steps[-1]
