"""The run's number format, the GPU kernel switches and the GPU-side step timing (plain torch, no Ray, no GPU:
device capabilities are simulated)."""

import math
import os

import pytest
import torch
import torchvision

from raymtl.config import load_experiment
from raymtl.errors import ConfigError
from raymtl.train import precision as precision_mod
from raymtl.train import timing
from raymtl.train.checkpoint import Position, RunMeta, load_train_state, save_train_state
from raymtl.train.loop import _step
from raymtl.train.precision import Precision, choose, configure_kernels, for_inference
from raymtl.train.timing import StepTimer

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("setting", "mixed", "cuda", "bf16", "expected"),
    [
        ("auto", True, True, True, "bf16"),  # A100/H100
        ("auto", True, True, False, "fp16"),  # T4/V100: fp16 + GradScaler, not emulated bf16
        ("auto", True, False, False, "fp32"),  # CPU
        ("auto", False, True, True, "fp32"),  # the older switch turned off
        ("fp16", True, True, True, "fp16"),
        ("fp32", True, True, True, "fp32"),
        ("bf16", True, False, False, "fp32"),  # every setting computes in fp32 on the CPU
        ("fp16", False, True, False, "fp16"),  # an explicit format wins over mixed_precision
    ],
)
def test_choose_maps_setting_and_device_capability_to_a_format(setting, mixed, cuda, bf16, expected):
    assert choose(setting, mixed, cuda=cuda, bf16_supported=bf16) == expected


def test_bf16_on_a_gpu_without_it_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="bf16 is not supported by this GPU.*fp16 or auto"):
        choose("bf16", True, cuda=True, bf16_supported=False)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_auto_on_a_gpu_without_bf16_trains_fp16_with_a_gradient_scaler(monkeypatch):
    monkeypatch.setattr(precision_mod.torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    p = Precision.on(CUDA, "auto", True)
    assert p == Precision("fp16", "cuda")
    assert isinstance(p.scaler(), torch.amp.GradScaler)
    monkeypatch.setattr(precision_mod.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert Precision.on(CUDA, "auto", True).scaler() is None
    assert Precision.on(torch.device("cpu"), "auto", True) == Precision("fp32", "cpu")


def test_prediction_takes_the_training_format_or_what_this_gpu_has(monkeypatch):
    monkeypatch.setattr(precision_mod.torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    trained = {"training": {"precision": "bf16", "mixed_precision": True}}
    assert for_inference(CUDA, trained).name == "fp16"  # bf16-trained, served on a T4
    assert for_inference(CUDA, {"training": {"precision": "fp32"}}).name == "fp32"
    assert for_inference(CUDA, None).name == "fp16"  # an ensemble's members keep their own experiments
    assert for_inference(torch.device("cpu"), trained).name == "fp32"


def test_precision_is_checked_with_the_config():
    raw = {"name": "x", "tasks": [{"name": "a", "train": "t.parquet", "image_column": "i"}],
           "training": {"precision": "bf61"}}
    with pytest.raises(ConfigError, match="training.precision: unknown value 'bf61'.*did you mean 'bf16'"):
        load_experiment(raw)


def test_fp16_scaler_skips_an_overflowing_step_and_its_state_is_checkpointed_and_resumed(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = Precision("fp16", "cpu").scaler()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    model.weight.grad[0, 0] = math.inf  # an fp16 overflow
    _step(model, optimizer, scaler, grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert scaler.get_scale() == 2.0**16 / 2  # ... and the scale backed off
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    _step(model, optimizer, scaler, grad_clip=None)
    assert not torch.equal(before[0], model.weight)

    meta = RunMeta(model={}, schedule={})
    save_train_state(tmp_path, position=Position(), stage=0, optimizer=optimizer, scaler=scaler.state_dict(),
                     lr_schedule_state={}, ewma={}, affinity=None, rng_states=[], meta=meta)
    resumed = Precision("fp16", "cpu").scaler(load_train_state(tmp_path)["scaler"])
    assert resumed.state_dict() == scaler.state_dict()
    assert resumed.state_dict()["_growth_tracker"] == 1


@pytest.mark.parametrize("saved", [None, {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                          "growth_interval": 2000, "_growth_tracker": 3}])
def test_a_rank_without_a_batch_steps_the_synchronised_gradients_as_a_rank_with_one(saved):
    """Its first step of the run (or of a resume) has no batch: it never called scale(), the gradient
    sync filled its gradients (the other ranks', scaled); it unscales, clips and steps as they do."""
    ranks = []
    for has_batch in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scaler = Precision("fp16", "cpu").scaler(saved)
        if has_batch:
            scaler.scale(model(torch.ones(3, 4)).sum()).backward()
            synced = [p.grad.clone() for p in model.parameters()]
        else:
            for p, g in zip(model.parameters(), synced):
                p.grad = g.clone()
        _step(model, optimizer, scaler, grad_clip=1.0)
        ranks.append((model.state_dict(), scaler.state_dict()))
    (weights, state), (empty_weights, empty_state) = ranks
    assert state == empty_state and state["scale"] == (saved or {}).get("scale", 2.0**16)
    for key, value in weights.items():
        assert torch.equal(value, empty_weights[key]), key


@pytest.fixture
def global_switches(monkeypatch):
    """configure_kernels sets process-wide state: restored after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_float32_matmul_precision())
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.set_float32_matmul_precision(saved[2])


def test_deterministic_on_a_gpu_warns_instead_of_failing_a_cnn(global_switches):
    configure_kernels(CUDA, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # AdaptiveAvgPool2d's CUDA backward: a warning
    assert not torch.backends.cudnn.benchmark  # the autotuner's choice may differ between runs
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.get_float32_matmul_precision() == "high"
    net = torchvision.models.resnet18(num_classes=3)
    net(torch.randn(2, 3, 32, 32)).sum().backward()  # the CNN trains under these switches
    assert net.fc.weight.grad is not None


def test_kernel_switches_on_gpu_and_cpu(global_switches):
    configure_kernels(CUDA, deterministic=False)
    assert torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    configure_kernels(torch.device("cpu"), deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # the CPU has deterministic kernels for all
    assert not torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "highest"  # TF32 is a GPU switch


class FakeEvent:
    """A CUDA event whose recorded time comes from a fake GPU clock (ms)."""

    gpu_ms = iter([])

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None

    def record(self) -> None:
        self.at = next(FakeEvent.gpu_ms)

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.at - self.at


def test_step_timer_on_a_gpu_reads_events_once_at_the_epoch_end(monkeypatch):
    syncs = []
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(timing.torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    # GPU clock (ms) of (begin, fetched, done) for steps a, b (first of each), a, b. The host clock
    # (perf_counter) would see only launches; the split comes from the GPU's marks.
    FakeEvent.gpu_ms = iter([0, 500, 600, 600, 900, 1000, 1000, 1050, 1250, 1250, 1300, 1500])
    timer = StepTimer(CUDA)
    for task in ["a", "b", "a", "b"]:
        timer.begin()
        timer.fetched()
        timer.done(task, samples=8)
    assert syncs == []  # no step waits for the GPU
    timer.eval_started()
    out = timer.metrics(world_size=1)
    assert syncs == [CUDA]
    assert out["perf/data_wait_fraction"] == pytest.approx(0.1 / 0.5)
    assert out["perf/samples_per_s"] == pytest.approx(16 / 0.5)
    assert out["perf/steps_s"] == pytest.approx(0.6)
    assert out["perf/first_batch_wait_s"] == pytest.approx(0.8)
    assert out["perf/peak_gpu_mb"] == 3.0


def test_adamw_is_fused_only_on_a_gpu():
    from raymtl.config import TrainingSpec
    from raymtl.train.optim import build_optimizer

    optimizer = build_optimizer(torch.nn.Linear(2, 2), TrainingSpec(), 1e-3)
    assert not optimizer.defaults["fused"]


def test_a_deterministic_runs_workers_start_with_the_cublas_workspace_setting(tmp_path, monkeypatch):
    """cuBLAS reads it once, when it starts: a Ray Train worker gets it in its runtime env, not from the loop."""
    from raymtl.config import Experiment, TaskSpec, TrainingSpec
    from raymtl.data.task_info import TaskInfo
    from raymtl.train.trainer import make_trainer

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    infos = {"color": TaskInfo("color", "multiclass", ["a", "b"], 8, 4, True, False)}

    def worker_env(deterministic: bool) -> dict:
        exp = Experiment(name="t", storage_path=str(tmp_path), tasks=[TaskSpec("color", "unused.parquet", "image")],
                         training=TrainingSpec(deterministic=deterministic))
        return (make_trainer(exp, infos, inputs=object()).run_config.worker_runtime_env or {}).get("env_vars", {})

    assert worker_env(True) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert "CUBLAS_WORKSPACE_CONFIG" not in worker_env(False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own (smaller) choice is kept
    assert worker_env(True) == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
