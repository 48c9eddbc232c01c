"""Resume checks without Ray: the driver's refusal of a changed model, the loop's elastic position."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from raymtl.config import ConfigError
from raymtl.train.checkpoint import Position, RunMeta
from raymtl.train.checkpoint import resume_position
from raymtl.train.trainer import check_schedule, prepare
from test_training import catalogue, experiment


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A prepared experiment and a fake latest checkpoint of it (2 workers) in its run folder."""
    exp, infos = prepare(experiment(catalogue(tmp_path_factory.mktemp("guard"), {"color": 160, "style": 160}), "g",
                                    num_workers=2))
    run_dir = Path(exp.storage_path) / exp.name
    old, new = run_dir / "checkpoint_2026-01-01_00-00-00.000001", run_dir / "checkpoint_2026-01-02_00-00-00.000001"
    for folder in (old, new):
        folder.mkdir(parents=True)
    RunMeta.of(exp, infos, check_schedule(exp, infos), 2).save(new)
    return exp, infos


def with_color(exp, **changes):
    return dataclasses.replace(exp, tasks=[dataclasses.replace(t, **changes) if t.name == "color" else t for t in exp.tasks])


def test_unchanged_or_rescaled_run_may_resume(saved_run):
    exp, _ = saved_run
    prepare(exp)
    prepare(dataclasses.replace(exp, training=dataclasses.replace(exp.training, num_workers=1, batch_size=8)))


def test_changed_labels_tasks_or_model_are_refused_naming_the_change(saved_run):
    exp, infos = saved_run
    reordered = sorted(infos["color"].labels, reverse=True)
    with pytest.raises(ConfigError, match=r"cannot resume run 'g' from .*checkpoint_2026-01-02.*: labels of task 'color' changed"):
        prepare(with_color(exp, labels=reordered))
    with pytest.raises(ConfigError, match=r"tasks changed \(removed \['style'\], added \[\]\)"):
        prepare(dataclasses.replace(exp, tasks=[t for t in exp.tasks if t.name == "color"]))
    with pytest.raises(ConfigError, match=r"model architecture changed .*'hidden_dim': 64.*'hidden_dim': 32"):
        prepare(dataclasses.replace(exp, model=dataclasses.replace(exp.model, hidden_dim=32)))
    with pytest.raises(ConfigError, match=r"model groups changed"):
        prepare(dataclasses.replace(exp, model=dataclasses.replace(exp.model, groups={"a": ["color"], "b": ["style"]})))


def test_position_is_kept_and_a_resize_re_plans_the_rest_of_the_epoch(saved_run, caplog):
    exp, infos = saved_run
    two = RunMeta.of(exp, infos, {"color": 4, "style": 4}, 2)
    one = RunMeta.of(exp, infos, {"color": 8, "style": 8}, 1)
    mid = Position(epoch=1, step=3, global_step=11, worlds=[[2, 32, 0]])
    assert resume_position(two, two, mid) == mid
    assert resume_position(two, one, mid) == dataclasses.replace(mid, worlds=[[2, 32, 0], [1, 16, 3]])
    assert resume_position(two, one, dataclasses.replace(mid, worlds=[])).worlds == [[2, 32, 0], [1, 16, 3]]
    boundary = Position(epoch=1, step=0, global_step=8, worlds=[[2, 32, 0]])
    assert resume_position(two, one, boundary) == dataclasses.replace(boundary, worlds=[])
    reseeded = RunMeta(two.model, dict(two.schedule, seed=7))
    assert resume_position(two, reseeded, mid) == dataclasses.replace(mid, step=0, worlds=[])
    assert "changed task order (seed 0 -> 7): epoch 2 restarts from its first step" in caplog.text



def test_changed_training_rows_refuse_a_mid_epoch_resume_naming_the_task(saved_run, caplog):
    """The epoch's plan is a permutation of each task's row count: another count would re-read rows
    and skip others for the rest of the epoch. A resize keeps the rows; a new epoch plans on the new ones."""
    from raymtl.errors import DataError

    exp, infos = saved_run
    two = RunMeta.of(exp, infos, {"color": 4, "style": 4}, 2)
    n = two.schedule["rows"]["color"]
    assert two.schedule["rows"] == {name: info.n_train for name, info in infos.items()}
    grown = RunMeta(two.model, dict(two.schedule, rows=dict(two.schedule["rows"], color=n + 10)))
    mid = Position(epoch=1, step=3, global_step=11, worlds=[[2, 32, 0]])
    with pytest.raises(DataError, match=rf"cannot resume epoch 2 at step 3: the training rows changed \(task 'color' "
                                        rf"{n} -> {n + 10}\), .* restore the data the checkpoint was trained on, or "
                                        "train under a new name"):
        resume_position(two, grown, mid)
    one = RunMeta.of(exp, infos, {"color": 8, "style": 8}, 1)  # a resize: the same rows
    assert resume_position(two, one, mid).worlds == [[2, 32, 0], [1, 16, 3]]
    boundary = Position(epoch=1, step=0, global_step=8, worlds=[[2, 32, 0]])
    assert resume_position(two, grown, boundary) == dataclasses.replace(boundary, worlds=[])
    before = RunMeta(two.model, {k: v for k, v in two.schedule.items() if k not in ("rows", "shuffle")})
    assert resume_position(before, grown, mid) == mid  # a checkpoint from before the rows were recorded
    unshuffled = RunMeta(two.model, dict(two.schedule, shuffle=False))
    assert resume_position(two, unshuffled, mid) == dataclasses.replace(mid, step=0, worlds=[])
    assert "changed task order (shuffle True -> False): epoch 2 restarts from its first step" in caplog.text

def test_a_ranks_gpu_generator_is_saved_and_restored_with_the_rank_not_the_device_index(monkeypatch):
    """A rank sees every GPU of its node but draws only on its own: its state is that device's, and a
    resumed rank restores it onto the GPU it now has (simulated CUDA: generators by device index)."""
    import torch

    from raymtl.train.checkpoint import rng_state, set_rng_state

    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([7], dtype=torch.uint8)}
    current = {"device": 1}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": generators[device].clone())
    monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": generators.__setitem__(device, state))
    saved = rng_state()  # rank on GPU 1, whose generator it advanced
    assert torch.equal(saved["cuda"], torch.tensor([7], dtype=torch.uint8))
    generators.update({0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([0], dtype=torch.uint8)})
    current["device"] = 0  # resumed on GPU 0
    set_rng_state(saved)
    assert generators[0].item() == 7 and generators[1].item() == 0
    # a checkpoint from before: every visible GPU's state by index; this rank's device's is restored
    set_rng_state({**saved, "cuda": [torch.tensor([3], dtype=torch.uint8), torch.tensor([5], dtype=torch.uint8)]})
    assert generators[0].item() == 3 and generators[1].item() == 0
    current["device"] = 2  # a device the old checkpoint has no state for: left as it is
    set_rng_state({**saved, "cuda": [torch.tensor([3], dtype=torch.uint8)]})
    assert 2 not in generators


def test_a_checkpoint_whose_upload_did_not_finish_is_skipped_for_the_newest_complete_one(saved_run, tmp_path, caplog):
    """Ray Train uploads a URI run's checkpoint file by file into its final folder: a job that dies
    mid-upload leaves a folder with some files (run.json perhaps among them) that every retry would fail to load."""
    from raymtl.train.checkpoint import TRAIN_STATE_FILE, newest_checkpoint

    exp, infos = saved_run
    meta = RunMeta.of(exp, infos, check_schedule(exp, infos), 2)
    names = ["checkpoint_2026-01-01_00-00-00.000001", "checkpoint_2026-01-02_00-00-00.000001",
             "checkpoint_2026-01-03_00-00-00.000001"]
    for name in names:
        folder = tmp_path / name
        (folder / "tokenizer").mkdir(parents=True)
        for file in ("model.safetensors", "raymtl_model.json", TRAIN_STATE_FILE, "metrics.json", "tokenizer/vocab.txt"):
            (folder / file).write_bytes(b"x" * 100)
        meta.save(folder)
    (tmp_path / names[1] / "model.safetensors").unlink()  # only run.json and a few others arrived
    (tmp_path / names[2] / "tokenizer/vocab.txt").write_bytes(b"x" * 10)  # one cut short
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / names[0])
    assert f"skipping the incomplete checkpoint {tmp_path / names[2]} (its upload did not finish: " \
           "tokenizer/vocab.txt missing or short)" in caplog.text
    assert f"{tmp_path / names[1]} (its upload did not finish: model.safetensors missing or short)" in caplog.text
    # a checkpoint from before run.json listed its files: the ones a resume reads
    old = tmp_path / "checkpoint_2026-01-04_00-00-00.000001"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"model": meta.model, "schedule": meta.schedule}))
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / names[0])
    for file in ("model.safetensors", "raymtl_model.json", TRAIN_STATE_FILE):
        (old / file).write_bytes(b"x")
    assert newest_checkpoint(str(tmp_path)) == str(old)
