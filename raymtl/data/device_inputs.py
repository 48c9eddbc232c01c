"""Model inputs on the model's device: decoded uint8 images and integer token ids in, the model's tensors out.

Decode tasks ship what they decode: uint8 NHWC pixels and narrow integer token ids, a quarter of
float32's bytes through the object store, the network and the host-to-device copy. `DeviceInputs`
finishes the job on the device the model runs on (normalised float32 NCHW images, int64 ids and
mask), and it is the one place that does: training, validation, the affinity measurement (on the
training batches) and prediction all call it, so a saved model sees the same numbers wherever it
runs. Augmentation, when there is some, belongs here too: on the device, inside the step's pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from raymtl.config import DataSpec

_INDEX_KEYS = ("input_ids", "attention_mask")  # embedding lookups and masks: int64 on the device


def is_numeric(value: np.ndarray | torch.Tensor) -> bool:
    """Whether a batch column becomes a tensor (the task tag, ids and error strings stay behind)."""
    return isinstance(value, torch.Tensor) or value.dtype.kind in "biuf"


def host_tensor(value: np.ndarray, pin: bool) -> torch.Tensor:
    """`value` as a CPU tensor: copied into pinned memory when `pin` (the one copy a GPU needs);
    else wrapped, copied only when read-only (a zero-copy view of the object store)."""
    if pin:
        dtype = torch.from_numpy(np.empty(0, value.dtype)).dtype  # not from `value`: a read-only view warns
        out = torch.empty(value.shape, dtype=dtype, pin_memory=True)
        out.numpy()[...] = value
        return out
    return torch.from_numpy(value if value.flags.writeable else value.copy())


class DeviceInputs:
    """Decoded arrays (numpy or CPU tensors) -> the model's input tensors on `device`."""

    def __init__(self, data: DataSpec, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current one, by number
            self.device = torch.device("cuda", torch.cuda.current_device())
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in data.normalization())
        # uint8 -> [0, 1] -> (x - mean) / std as one multiply and one subtract (float32, any device)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (mean / std).to(self.device)

    def __call__(self, batch: Mapping[str, np.ndarray | torch.Tensor], *, non_blocking: bool = False) -> dict[str, torch.Tensor]:
        """Numeric columns moved to the device and finished there; string columns dropped.

        `non_blocking`: the caller passes pinned tensors and orders its streams itself (`raymtl.train.batches`).
        """
        out = {}
        for key, value in batch.items():
            if not is_numeric(value):
                continue
            tensor = value if isinstance(value, torch.Tensor) else host_tensor(value, pin=False)
            out[key] = self.finish(key, tensor.to(self.device, non_blocking=non_blocking))
        return out

    def finish(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """One column, already on the device, as the model takes it."""
        if key.startswith("view_") and tensor.dtype == torch.uint8:
            return self.normalise(tensor)
        if key in _INDEX_KEYS:
            return tensor.long()
        return tensor

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels -> normalised float32 NCHW (contiguous), on their device."""
        x = pixels.permute(0, 3, 1, 2).contiguous().float()
        return x.mul_(self.scale).sub_(self.shift)
