"""Which device a model instance runs on, from its instance group and the visible GPUs.

The node agent restricts a replica with CUDA_VISIBLE_DEVICES; inside the
process the visible GPUs are numbered from 0. No GPU library is imported:
counting is done from the environment and the device files, so CPU-only
hosts pay nothing.
"""

from __future__ import annotations

import glob
import os

from meshserve.protos.inference import model_config_pb2 as mc


def visible_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
        return len(entries)
    return len(glob.glob("/dev/nvidia[0-9]*"))


def instance_devices(config: mc.ModelConfig, count: int) -> list[str]:
    """One device per instance: "cuda:N" for GPU (or AUTO with a GPU present) groups, else "cpu"."""
    gpus = visible_gpu_count()
    devices: list[str] = []
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(count=count)]
    for group in groups:
        wants_gpu = group.kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO)
        ids = list(group.gpus) or list(range(gpus))
        for index in range(group.count or 1):
            devices.append(f"cuda:{ids[index % len(ids)]}" if wants_gpu and gpus and ids else "cpu")
    return devices[:count] if len(devices) >= count else devices + ["cpu"] * (count - len(devices))
