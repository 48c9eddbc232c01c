"""`raymtl train` as a user meets it: fast one-line errors, and a quiet console around a real run.

The error tests run the command in a subprocess, as a shell would (the flag tests call `main` here).
The fast ones must finish well before Ray could start (the documented figure is about 1-2 s; the
bound here is generous).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from raymtl.cli import apply_overrides, build_parser, main
from raymtl.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
FAST_S = 5.0


def raymtl(*args: str, cwd: Path, timeout: float = 60, ray_tmp: Path | None = None,
           before: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """Run `raymtl ARGS` in a new Python process; `ray_tmp`: the folder a Ray cluster it starts
    would write its session to; `before`: Python run before the command (a test's setting)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    code = f"import sys\n{before}\nfrom raymtl.cli import main\nsys.exit(main(sys.argv[1:]))"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.monotonic() - start


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line on stderr, `raymtl: error: ...`."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout
    assert len(lines) == 1 and lines[0].startswith("raymtl: error: "), done.stderr
    return lines[0]


def write_task(root: Path, name: str, n: int, bad: dict[int, str] | None = None) -> Path:
    """`n` rows of 16 px images (label = image color), `bad` row -> 'corrupt' or 'missing'."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "images" / f"{name}-{i:03d}.png"
        label = "red" if i % 2 else "blue"
        kind = (bad or {}).get(i)
        if kind == "corrupt":
            path.write_bytes(b"not a png at all")
        elif kind != "missing":
            Image.new("RGB", (16, 16), (200, 30, 30) if label == "red" else (30, 30, 200)).save(path)
        rows.append({"id": f"{name}-{i}", "image": str(path), "label": label})
    out = root / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def write_config(root: Path, table: Path, **sections) -> Path:
    config = {
        "name": "run",
        "storage_path": str(root / "runs"),
        "tasks": [{"name": "color", "train": str(table), "validation": str(table), "image_column": "image"}],
        "data": {"image_size": 16, "views": [{"name": "full"}]},
        "model": {"hidden_dim": 16},
        "training": {"epochs": 2, "batch_size": 8, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- errors in seconds


def test_missing_file_malformed_yaml_and_missing_column_fail_fast(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\ntasks: [a\n")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "1", "image": "a.png", "labl": "x"}]), table)
    no_label = write_config(tmp_path, table)
    cases = [
        ("missing.yaml", "config file 'missing.yaml' does not exist"),
        ("bad.yaml", "bad.yaml: malformed YAML at line 3, column 1"),
        (str(no_label), "label_column 'label' not found in"),
    ]
    for config, expected in cases:
        done, wall = raymtl("train", config, cwd=tmp_path)
        assert expected in one_error_line(done)
        assert done.returncode == 2 and done.stdout == ""
        assert wall < FAST_S, f"{config}: {wall:.1f} s"


def test_a_checkpoint_metric_never_measured_fails_before_torch_is_imported(tmp_path):
    """As the README says of every config and data fault: found by the command line's own checks."""
    table = write_task(tmp_path, "color", 8)
    config = write_config(tmp_path, table, training={"checkpoint_metric": "val/style/accuracy"},
                          tasks=[{"name": "color", "train": str(table), "validation": str(table), "image_column": "image"},
                                 {"name": "style", "train": str(table), "image_column": "image"}])
    done, _ = raymtl("train", str(config), cwd=tmp_path, before="sys.modules['torch'] = sys.modules['ray'] = None")
    assert "training.checkpoint_metric: 'val/style/accuracy' is never measured: task 'style' has no validation " \
           "data" in one_error_line(done)
    assert done.returncode == 2


def test_tune_config_and_data_errors_fail_fast(tmp_path):
    table = write_task(tmp_path, "color", 16)
    bad_key = write_config(tmp_path, table, sweep={"groupings": "serch"}).rename(tmp_path / "bad_key.yaml")
    no_column = write_config(tmp_path, table, sweep={"lr": [0.001, 0.01]},
                             tasks=[{"name": "color", "train": str(table), "image_column": "img"}])
    cases = [
        ("missing.yaml", "config file 'missing.yaml' does not exist"),
        (str(bad_key), "sweep.groupings: expected a list of groupings or 'search', got 'serch'"),
        (str(no_column), "image_column 'img' not found in"),
    ]
    for config, expected in cases:
        done, wall = raymtl("tune", config, cwd=tmp_path)
        assert expected in one_error_line(done)
        assert done.returncode == 2 and done.stdout == ""
        assert wall < FAST_S, f"{config}: {wall:.1f} s"


def test_predict_path_errors_fail_fast(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "raymtl_model.json").write_text("{}")  # only its presence is checked before the model loads
    table = write_task(tmp_path, "color", 4)
    (tmp_path / "taken").mkdir()
    cases = [
        ((str(tmp_path / "nomodel"), str(table), "out"), f"'{tmp_path}/nomodel' is not a raymtl model folder"),
        ((str(model), "missing.parquet", "out"), f"'{tmp_path}/missing.parquet' does not exist"),
        ((str(model), str(table), str(tmp_path / "taken")), "already exists; choose another path or overwrite"),
    ]
    for args, expected in cases:
        done, wall = raymtl("predict", *args, cwd=tmp_path)
        assert expected in one_error_line(done)
        assert done.returncode == 2 and done.stdout == ""
        assert wall < FAST_S, f"{args}: {wall:.1f} s"


@pytest.mark.parametrize(
    "sections, culprit",
    [
        ({"training": {"lr": -0.001}}, "training.lr: must be > 0, got -0.001"),
        ({"model": {"dropout": 1.5}}, "model.dropout: must be in [0,1), got 1.5"),
        ({"storage_path": "FILE/runs"}, "storage_path '{root}/afile/runs' is not writable"),
    ],
)
def test_bad_settings_stop_before_ray_with_one_line(tmp_path, sections, culprit):
    (tmp_path / "afile").write_text("a file, not a folder")
    if sections.get("storage_path"):
        sections = {"storage_path": sections["storage_path"].replace("FILE", str(tmp_path / "afile"))}
    config = write_config(tmp_path, write_task(tmp_path, "color", 16), **sections)
    done, wall = raymtl("train", str(config), cwd=tmp_path)
    assert culprit.format(root=tmp_path) in one_error_line(done)
    assert wall < FAST_S


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_bad_image_in_the_sample_stops_before_ray(tmp_path, kind):
    table = write_task(tmp_path, "color", 16, bad={0: kind})
    strict = write_config(tmp_path, table, data={"skip_bad_images": False})
    done, wall = raymtl("train", str(strict), cwd=tmp_path)
    line = one_error_line(done)
    assert f"task 'color': cannot read image '{tmp_path}/images/color-000.png' in column 'image'" in line
    assert "data.skip_bad_images: true" in line
    assert wall < FAST_S


# ---------------------------------------------------------------- command-line overrides


@pytest.mark.parametrize(
    "verb, flags, culprit",
    [
        ("train", ["--workers", "0"], "--workers: training.num_workers: expected N >= 1"),
        ("train", ["--workers", "2", "--epochs", "0"], "--epochs: training.epochs: must be >= 1, got 0"),
        ("train", ["--cpus-per-worker", "0"], "--cpus-per-worker: training.cpus_per_worker: must be > 0, got 0.0"),
        ("tune", ["--workers", "-1"], "--workers: training.num_workers: expected N >= 1"),
        ("tune", ["--max-concurrent", "0"], "--max-concurrent: sweep.max_concurrent: must be >= 1, got 0"),
    ],
)
def test_a_bad_override_is_refused_naming_its_flag(tmp_path, capsys, verb, flags, culprit):
    """A 0 is applied (and refused), not read as "no flag" leaving the config's value in place."""
    config = write_config(tmp_path, tmp_path / "t.parquet", sweep={"seeds": [0, 1]})
    assert main([verb, str(config), *flags]) == 2  # refused before the data is read or Ray starts
    assert f"raymtl: error: {culprit}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--name", "--storage"])
def test_an_empty_name_or_storage_is_refused(capsys, flag):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "c.yaml", flag, ""])
    assert f"argument {flag}: must not be empty" in capsys.readouterr().err


def test_overrides_replace_the_config_values(tmp_path):
    config = write_config(tmp_path, tmp_path / "t.parquet", training={"epochs": 5, "stages": [{"epochs": 2}]})
    args = build_parser().parse_args(["train", str(config), "--workers", "3", "--epochs", "1", "--gpu",
                                      "--cpus-per-worker", "0.5", "--name", "b", "--storage", "s3://x/runs"])
    exp = apply_overrides(load_experiment(config), args)
    assert (exp.name, exp.storage_path) == ("b", "s3://x/runs")
    tr = exp.training
    assert (tr.num_workers, tr.epochs, tr.stages, tr.use_gpu, tr.cpus_per_worker) == (3, 1, [], True, 0.5)


@pytest.mark.parametrize("flag", ["--workers", "--epochs"])
def test_a_zero_demo_flag_is_refused_naming_it_before_the_catalogue_is_written(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path), flag, "0"])
    assert exit_.value.code == 2 and not any(tmp_path.iterdir())
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_the_sweep_is_checked_against_the_experiment_the_flags_make(tmp_path, capsys, monkeypatch):
    """One a flag breaks is refused, not blamed on --max-concurrent; one a flag makes valid is not refused."""
    config = write_config(tmp_path, tmp_path / "t.parquet", sweep={"seeds": [0, 1], "gpus_per_trial": 0.5})
    assert main(["tune", str(config), "--workers", "2", "--max-concurrent", "2"]) == 2
    err = capsys.readouterr().err
    assert "sweep.gpus_per_trial" in err and "--max-concurrent" not in err
    two = write_config(tmp_path, tmp_path / "t.parquet", sweep={"seeds": [0, 1], "gpus_per_trial": 0.5},
                       training={"num_workers": 2})
    monkeypatch.setattr("raymtl.preflight.check", lambda exp: pytest.fail(f"checked with {exp.training.num_workers}"))
    with pytest.raises(pytest.fail.Exception, match="checked with 1"):  # on to the data checks, one worker
        main(["tune", str(two), "--workers", "1"])


# ---------------------------------------------------------------- inside Ray (slow)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cache", ["never", "always"])
def test_bad_image_met_in_decoding_is_one_line_naming_it(tmp_path, cache):
    # Row 1 is outside the pre-flight sample (rows 0, 5, 10, ...): only decoding meets it, inside
    # Ray's decode tasks ("never": streamed) or in the driver (a small "always" cache).
    table = write_task(tmp_path, "color", 40, bad={1: "corrupt"})
    config = write_config(tmp_path, table, data={"cache": cache, "skip_bad_images": False})
    done, _ = raymtl("train", str(config), cwd=tmp_path, timeout=500)
    line = one_error_line(done)
    assert done.returncode == (1 if cache == "never" else 2)  # met during training, or before it
    assert f"cannot read image '{tmp_path}/images/color-001.png'" in line
    assert "data.skip_bad_images: true" in line
    log = re.search(r"\[full log: (.+)\]", line).group(1)
    assert log == str(tmp_path / "runs" / "run" / "raymtl.log")
    assert "Traceback" in Path(log).read_text()


@pytest.fixture
def ray_tmp():
    """A short folder for a Ray session (its socket paths must stay under 108 bytes), not yet made."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield root / "ray"
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_console_is_quiet_and_shows_the_epoch_table(tmp_path, ray_tmp):
    """One worker, cached inputs, a local run folder: the run trains in the command's own process
    and never starts a Ray cluster."""
    config = write_config(tmp_path, write_task(tmp_path, "color", 32), training={"keep_checkpoints": 1})
    done, _ = raymtl("train", str(config), cwd=tmp_path, timeout=500, ray_tmp=ray_tmp)
    assert done.returncode == 0, done.stderr
    assert not ray_tmp.exists()
    run = tmp_path / "runs" / "run"
    kept = sorted(p.name for p in run.glob("checkpoint_*"))
    assert 1 <= len(kept) <= 2  # the best, and the latest when another
    assert re.search(rf"^latest checkpoint: +{run}/{kept[-1]}$", done.stdout, re.M)
    assert re.search(rf"^best checkpoint: +{run}/checkpoint_", done.stdout, re.M)
    shown = done.stdout + done.stderr
    noisy = [line for line in shown.splitlines() if re.search(r"\b(INFO|WARNING|WARN)\b|TrainingReport", line)]
    assert noisy == []
    assert re.search(r"^epoch +color loss +color acc", done.stdout, re.M)
    assert re.search(r"^epoch 2/2  val loss", done.stdout, re.M)
    log = (tmp_path / "runs" / "run" / "raymtl.log").read_text()
    assert "epoch 2/2  val loss" in log and "color acc" in log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cache_decoded_by_ray_data_outlives_the_cluster_it_was_decoded_on(tmp_path, ray_tmp):
    """One worker in the command's process, with a cache too large for the driver to decode alone
    (here: over 16 rows): Ray Data decodes it on a local cluster, the process copies it and shuts
    the cluster down, then trains from the copy."""
    config = write_config(tmp_path, write_task(tmp_path, "color", 32))
    done, _ = raymtl("train", str(config), cwd=tmp_path, timeout=500, ray_tmp=ray_tmp,
                     before="from raymtl.data import datasets\ndatasets._CACHE_BLOCK_ROWS = 16")
    assert done.returncode == 0, done.stderr
    assert ray_tmp.is_dir()  # Ray did start, for the decode
    assert re.search(r"^epoch 2/2  val loss", done.stdout, re.M)
