"""ResNet-18 and MobileNetV2, written to match torchvision's modules and parameter names.

torchvision is not a dependency, so the two architectures are spelt out here; their state-dict
keys equal torchvision's (`layer1.0.conv1.weight`, `features.3.conv.1.0.weight`, ...). Weights
are seeded and random, and every BatchNorm gets random statistics and affine parameters so that
a folding bug changes the outputs instead of hiding behind mean 0, variance 1.
"""

from __future__ import annotations

import torch
from torch import nn

from models.images import IMAGENET_NORMALISATION, PhotoCropData
from models.seeding import seeded
from models.zoo_model import ZooModel, classifier_zoo_model

RESNET18_SEED = 18
MOBILENET_V2_SEED = 2
NUM_CLASSES = 1000


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add (1x1 conv-BN on the skip when shapes change)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2015) as in torchvision: stem, four stages of two BasicBlocks, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        """Returns two BasicBlocks, the first with the stride."""
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Maps (N, 3, 224, 224) images to (N, 1000) logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(input))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBNActivation(nn.Sequential):
    """Conv2d, BatchNorm2d, ReLU6 (torchvision's Conv2dNormActivation with ReLU6)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels, channels, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1 (linear); a residual add when shapes allow."""

    def __init__(self, in_channels: int, channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns conv(x), plus x when the block keeps the shape."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, as in torchvision."""

    #: (expansion t, output channels c, repeats n, first stride s) per stage, from the paper.
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNActivation(3, 32, stride=2)]
        in_channels = 32
        for expand_ratio, channels, repeats, first_stride in self.SETTINGS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(in_channels, channels, stride, expand_ratio))
                in_channels = channels
        layers.append(ConvBNActivation(in_channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        self._initialise()

    def _initialise(self) -> None:
        """Initialise as torchvision does: Kaiming fan-out convs, N(0, 0.01) classifier."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Maps (N, 3, 224, 224) images to (N, 1000) logits."""
        x = nn.functional.adaptive_avg_pool2d(self.features(input), (1, 1))
        return self.classifier(torch.flatten(x, 1))


@torch.no_grad()
def randomise_batchnorm(model: nn.Module) -> None:
    """Gives every BatchNorm realistic random statistics and affine parameters, in place.

    Uses the global generator, so call it inside `seeded`: running mean ~ N(0, 0.1), running
    variance ~ U(0.5, 1.5), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1).
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.1)


def build_resnet18() -> ZooModel:
    """Returns ResNet-18 with seeded random weights and BatchNorm statistics."""
    with seeded(RESNET18_SEED):
        model = ResNet18()
        randomise_batchnorm(model)
    description = "ResNet-18 (torchvision layout), seeded random weights and BatchNorm statistics"
    return classifier_zoo_model("resnet18", description, model, PhotoCropData(IMAGENET_NORMALISATION))


def build_mobilenet_v2() -> ZooModel:
    """Returns MobileNetV2 with seeded random weights and BatchNorm statistics."""
    with seeded(MOBILENET_V2_SEED):
        model = MobileNetV2()
        randomise_batchnorm(model)
    description = "MobileNetV2 (torchvision layout), seeded random weights and BatchNorm statistics"
    return classifier_zoo_model("mobilenet-v2", description, model, PhotoCropData(IMAGENET_NORMALISATION))
