"""The epoch table and the loop's step timings (plain Python, no Ray)."""

import pytest

from raymtl.train import timing
from raymtl.train.report import format_history
from raymtl.train.timing import StepTimer


def test_step_timer_splits_wait_from_compute_and_counts_first_batches_apart(monkeypatch):
    # epoch start, (begin, fetched, done) of four steps: a, b (first of each), then a, b again;
    # evaluation starts at 16, metrics read at 20
    clock = iter([0, 0, 5, 6, 6, 9, 10, 10, 10.5, 12.5, 12.5, 13, 15, 16, 20])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(timing.time, "time", lambda: 1000.0)
    timer = StepTimer()
    for task in ["a", "b", "a", "b"]:
        timer.begin()
        timer.fetched()
        timer.done(task, samples=8)
    timer.eval_started()
    # steady steps: waits 0.5 + 0.5, computes 2 + 2; first batches waited 5 + 3
    assert timer.metrics(world_size=2) == {
        "perf/data_wait_fraction": pytest.approx(1 / 5),
        "perf/first_batch_wait_s": pytest.approx(8.0),
        "perf/samples_per_s": pytest.approx(2 * 16 / 5),
        "perf/epoch_s": 20.0,
        "perf/eval_s": 4.0,
        "perf/steps_s": 6.0,  # compute of all four steps: 1 + 1 + 2 + 2
        "perf/first_step_unix": 1000.0,
    }


def test_step_timer_without_steady_steps_reports_the_start_and_the_epoch(monkeypatch):
    clock = iter([0, 1, 2, 3, 4, 6, 9])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(timing.time, "time", lambda: 1000.0)
    timer = StepTimer()  # the epoch starts at 0
    timer.streams_started()  # 1 s to open the streams
    timer.begin()
    timer.fetched()  # 1 s more for the first batch
    timer.done("a", samples=4)
    timer.eval_started()  # at 6, metrics read at 9
    assert timer.metrics(world_size=1) == {
        "perf/first_batch_wait_s": 2.0, "perf/epoch_s": 9.0, "perf/eval_s": 3.0, "perf/steps_s": 1.0,
        "perf/first_step_unix": 1000.0,
    }


def test_table_has_a_row_per_epoch_with_task_columns_and_throughput():
    history = [
        {"epoch": 1, "global_step": 4, "val/color/loss": 1.5, "val/color/accuracy": 0.5,
         "val/style/loss": 0.7, "val/style/micro_f1": 0.25, "train/color/loss_ewma": 1.6,
         "val/mean_loss": 1.1, "val/mean_score": 0.375,
         "perf/samples_per_s": 123.456, "perf/data_wait_fraction": 0.0312, "perf/first_batch_wait_s": 2.0,
         "perf/epoch_s": 31.25, "perf/eval_s": 3.0},
        {"epoch": 2, "global_step": 8, "val/color/loss": 1.0, "val/color/accuracy": 0.75,
         "val/style/loss": 0.5, "val/style/micro_f1": 0.5, "val/mean_loss": 0.75, "val/mean_score": 0.625},
    ]
    header, rule, first, second = format_history(history).splitlines()
    assert [c.strip() for c in header.split("  ") if c.strip()] == [
        "epoch", "color loss", "color acc", "style loss", "style f1", "mean loss", "mean score", "samples/s", "data wait", "epoch s",
    ]
    assert first.split() == ["1", "1.5000", "0.5000", "0.7000", "0.2500", "1.1000", "0.3750", "123.5", "3.1%", "31.2"]
    assert second.split() == ["2", "1.0000", "0.7500", "0.5000", "0.5000", "0.7500", "0.6250", "-", "-", "-"]


def test_step_log_line_of_a_rank_without_a_batch_yet_says_so(tmp_path, caplog):
    """Rank 0's shard ran short before a task's first batch: the step still logs, without a loss."""
    import logging

    from raymtl.train.metrics import Ewma
    from raymtl.train.report import RunFiles

    files = RunFiles(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="raymtl"):
        files.log_step(0, 10, 10, "color", Ewma(0.1))
        trained = Ewma(0.1)
        trained.update(0.5)
        files.log_step(0, 10, 10, "color", trained)
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 1 step 10/10  color loss~n/a (no batch yet)", "epoch 1 step 10/10  color loss~0.5000"]
