"""The benchmark suite: named, realistic BatchNorm shapes, scaled down on the CPU."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Case:
    name: str
    shape: Tuple[int, ...]
    layout: str  # "contiguous" or "channels_last"
    quick: bool = False

    @property
    def kind(self) -> int:
        return 1 if len(self.shape) <= 3 else len(self.shape) - 2

    def memory_format(self) -> Optional[torch.memory_format]:
        if self.layout != "channels_last":
            return None
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d


def suite(device: str):
    """Shapes per device: full size on the GPU, batch and volume scaled down on the CPU."""
    gpu = device == "cuda"
    n = 32 if gpu else 4  # ResNet-50 batch
    vol = 64 if gpu else 32  # 3D U-Net volume edge
    cases = []
    resnet = [
        ("resnet50.bn1", (n, 64, 112, 112)),
        ("resnet50.layer1", (n, 256, 56, 56)),
        ("resnet50.layer2", (n, 512, 28, 28)),
        ("resnet50.layer3", (n, 1024, 14, 14)),
    ]
    for name, shape in resnet:
        cases.append(Case(name, shape, "contiguous", quick=name == "resnet50.layer2"))
        cases.append(Case(name, shape, "channels_last", quick=name == "resnet50.layer2"))
    cases += [
        Case("many_channels.c2048x7x7", (n, 2048, 7, 7), "contiguous"),
        Case("many_channels.c2048x7x7", (n, 2048, 7, 7), "channels_last"),
        Case("unet3d.block", (2, 32, vol, vol, vol), "contiguous", quick=True),
        Case("unet3d.block", (2, 32, vol, vol, vol), "channels_last"),
        Case("few_channels.c3x224", (n, 3, 224, 224), "contiguous", quick=True),
        Case("few_channels.c3x224", (n, 3, 224, 224), "channels_last"),
        Case("few_channels.c8x32cube", (n, 8, 32, 32, 32), "contiguous"),
        Case("bn1d.4096x1024", (4096, 1024), "contiguous", quick=True),
        Case("bn1d.sequence", (n * 8, 256, 128), "contiguous"),
    ]
    return cases
