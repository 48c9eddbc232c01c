"""The console's pieces without Ray running: root causes under Ray's wrappers, the progress view."""

from __future__ import annotations

import io

from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from raymtl import console
from raymtl.config import Experiment, TaskSpec, TrainingSpec
from raymtl.data.transforms import BadImageError


def wrapped_in_ray(error: Exception) -> Exception:
    """`error` as a driver sees it from a Ray Data task inside a training worker."""
    try:
        raise error
    except Exception as e:  # noqa: BLE001
        task_error = RayTaskError("map_batches", "Traceback ...\n  worker frames", e)
    return WorkerGroupError("rank 0 failed", {1: RuntimeError("rank 1 saw rank 0 go"), 0: task_error})


def test_root_cause_finds_the_users_message_under_ray_wrappers():
    bad = BadImageError("task 'color': cannot read image '/data/x.png' in column 'image': OSError: truncated")
    assert console.root_cause(wrapped_in_ray(bad)) is bad
    line = console.error_line(wrapped_in_ray(bad))
    assert line.startswith("raymtl: error: task 'color': cannot read image '/data/x.png'")
    assert "set data.skip_bad_images: true" in line and "\n" not in line


def test_root_cause_of_a_plain_worker_exception_names_its_type():
    err = ValueError("Invalid learning rate: -0.1")
    line = console.error_line(ControllerError(RuntimeError("controller")).with_traceback(None))
    assert line == "raymtl: error: RuntimeError: controller"
    assert console.error_line(WorkerGroupError("w", {0: err})) == "raymtl: error: ValueError: Invalid learning rate: -0.1"


def test_chained_causes_resolve_to_the_innermost():
    try:
        try:
            raise KeyError("label")
        except KeyError as inner:
            raise RuntimeError("while reading a batch") from inner
    except RuntimeError as outer:
        assert isinstance(console.root_cause(outer), KeyError)


def test_progress_view_prints_one_line_per_epoch_off_a_terminal(capsys):
    exp = Experiment("x", [TaskSpec("color", "t.parquet", image_column="image")],
                     training=TrainingSpec(epochs=2, batch_size=8, num_workers=2))
    view = console.ProgressView(exp, out=io.StringIO())  # not a TTY: no bar drawn
    view.show([
        {"kind": "step", "epoch": 0, "step": 1, "steps": 10, "task": "color", "loss": 1.5, "time": 100.0},
        {"kind": "step", "epoch": 0, "step": 6, "steps": 10, "task": "color", "loss": 1.2, "time": 101.0},
        {"kind": "epoch", "row": {"epoch": 1, "val/mean_loss": 0.9, "val/mean_score": 0.75, "perf/epoch_s": 3.0}},
    ])
    assert view.bar is None
    assert capsys.readouterr().out == "epoch 1/2  val loss 0.9000, score 0.7500  3.0 s\n"


def test_a_cause_lost_in_pickling_is_read_from_the_remote_traceback():
    from ray.exceptions import UserCodeException

    remote = (
        "\x1b[36mray::MapBatches(Preprocessor)()\x1b[39m (pid=1, ip=10.0.0.1)\n"
        '  File "transforms.py", line 223, in load_image\n'
        "PIL.UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f>\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "raymtl.data.transforms.BadImageError: task 'color': cannot read image '/d/c-1.png' in column 'image'\n"
    )
    error = RayTaskError("MapBatches(Preprocessor)", remote, UserCodeException("UDF failed"))
    line = console.error_line(error)
    assert line.startswith("raymtl: error: task 'color': cannot read image '/d/c-1.png' in column 'image'")
    assert "skip_bad_images" in line
