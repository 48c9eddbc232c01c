"""The number format a run computes in, and the GPU's kernel switches.

`training.precision`: "auto" is bf16 autocast on a GPU that supports it (Ampere and newer), fp16
autocast with a `GradScaler` on one that does not (T4, V100: bf16 there would be emulated, several
times slower), and fp32 on the CPU (autocast's bf16 convolutions are slower than fp32 there). "bf16"
and "fp16" choose on a GPU; on the CPU every setting computes in fp32. The older switch
`training.mixed_precision: false` means "fp32" when `precision` is left at "auto".

Training, validation and prediction run under the same autocast (`Precision.autocast`), so a model
is scored in the format it trained in. fp16 gradients are scaled against underflow: the scaler's
state (its scale and growth tracker) is part of the checkpoint.

`configure_kernels` sets the process-wide switches once per run: cuDNN's autotuner
(`cudnn.benchmark`) unless the run is deterministic, TF32 for the fp32 matrix products
(`set_float32_matmul_precision("high")`; cuDNN convolutions allow TF32 by default), and
deterministic algorithms. On a GPU those come with `warn_only`: some CUDA kernels have no
deterministic version (`AdaptiveAvgPool2d`'s backward, which every torchvision classifier ends
with; the others PyTorch lists under `torch.use_deterministic_algorithms`) and warn instead of
failing the run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from raymtl.config import PRECISIONS
from raymtl.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose(setting: str, mixed_precision: bool, *, cuda: bool, bf16_supported: bool) -> str:
    """The format ("bf16", "fp16" or "fp32") `setting` means on a device with these capabilities."""
    if setting not in PRECISIONS:
        raise ConfigError(f"training.precision: unknown value {setting!r}; choose one of {', '.join(PRECISIONS)}")
    if not cuda:
        return "fp32"
    if setting == "auto":
        if not mixed_precision:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if setting == "bf16" and not bf16_supported:
        raise ConfigError("training.precision: bf16 is not supported by this GPU (it would be emulated); "
                          "use fp16 or auto (fp16 with gradient scaling)")
    return setting


@dataclass(frozen=True)
class Precision:
    """A run's format on its device: its autocast and, for fp16, a gradient scaler."""

    name: str  # bf16 | fp16 | fp32
    device_type: str

    @classmethod
    def on(cls, device: torch.device, setting: str = "auto", mixed_precision: bool = True) -> Precision:
        """The format for `device`, from its capabilities."""
        cuda = device.type == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
        return cls(choose(setting, mixed_precision, cuda=cuda, bf16_supported=bf16), device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def scaler(self, state: dict | None = None) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16, from its checkpointed `state` if any; None for formats that need none.

        Its scale tensor is made here, not at its first `scale()` as torch makes it: a rank whose first
        step (of the run or of a resume) has no batch of its own still unscales and steps the gradients
        the other ranks synchronised, with the scale they used.
        """
        if self.name != "fp16":
            return None
        scaler = torch.amp.GradScaler(self.device_type)
        if state:
            scaler.load_state_dict(state)
        if scaler.is_enabled():  # torch disables it where the device is missing
            scaler.scale(torch.zeros((), device=self.device_type))
        return scaler


def for_inference(device: torch.device, experiment: dict | None) -> Precision:
    """The format a saved model trained in (its experiment's `training` section), on this device; a
    format this device lacks (bf16 on a T4) becomes what "auto" picks here."""
    training = (experiment or {}).get("training") or {}
    mixed = training.get("mixed_precision", True)
    try:
        return Precision.on(device, training.get("precision", "auto"), mixed)
    except ConfigError:
        return Precision.on(device, "auto", mixed)


def kernel_env(deterministic: bool) -> dict[str, str]:
    """The environment a deterministic run's processes start with: cuBLAS reads its workspace setting
    once, when it starts, so a Ray Train worker gets it in its runtime env rather than from the loop."""
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")} if deterministic else {}


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """The process-wide switches for a run on `device` (see the module docstring)."""
    cuda = device.type == "cuda"
    torch.use_deterministic_algorithms(deterministic, warn_only=cuda)  # also undoes an earlier run's, in this process
    if deterministic:
        for name, value in kernel_env(deterministic).items():  # an in-process run: before its first CUDA op
            os.environ.setdefault(name, value)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True
    if cuda:
        torch.set_float32_matmul_precision("high")
