"""resnet50_torch: ResNet-50 with random, seeded weights, run by PyTorch.

INPUT FP32 [batch, 3, 224, 224] -> OUTPUT FP32 [batch, 1000] (logits).

The weights are random (``torch.manual_seed`` from parameter ``seed``), so the
logits mean nothing; the model exists to put a realistic convolutional load
on a GPU and to exercise large dynamic batches. The network comes from
``torchvision.models.resnet50(weights=None)`` when torchvision is importable
(nothing is downloaded); otherwise the same architecture (bottleneck blocks
3-4-6-3, 25.6 M parameters) is built from the definition below, which needs
only torch.

Device: ``config["device"]`` when it names a CUDA device, else ``cuda`` when
``torch.cuda.is_available()``, else the CPU. On a GPU the model runs in fp16
(inputs are cast to half, logits come back as float32); on the CPU in fp32.
Always eval mode under ``torch.inference_mode()``.

Without PyTorch this module raises ImportError at import time, naming torch;
the runtime reports that as this model's load failure.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resnet50_torch needs PyTorch, but `import torch` failed "
        f"({exc}); install torch (and optionally torchvision) to serve this model"
    ) from exc


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _ResNet50(nn.Module):
    """ResNet-50 (v1.5: stride on the 3x3 conv), used when torchvision is absent."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_channels = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(_Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet50() -> nn.Module:
    try:
        from torchvision.models import resnet50
    except ImportError:
        return _ResNet50()
    return resnet50(weights=None)


class Predictor:
    def __init__(self, config: dict):
        params = config.get("parameters") or {}
        self.name = config.get("name", "resnet50_torch")
        requested = str(config.get("device") or "cpu")
        if requested.startswith("cuda") and torch.cuda.is_available():
            self.device = torch.device(requested)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32

        torch.manual_seed(int(params.get("seed", "0")))
        model = build_resnet50().eval()
        self.model = model.to(device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(inputs["INPUT"], dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (3, 224, 224):
            raise ValueError(f"{self.name}: INPUT must be [batch, 3, 224, 224], got {list(batch.shape)}")
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self.dtype)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.model(x)
            return {"OUTPUT": logits.float().cpu().numpy()}
