"""Small models on the digits: the classic pruning MLP, LeNet-5 and the trained digits CNN.

The MLP and LeNet keep seeded random weights (they exercise passes, not accuracy); `DigitsCNN`
is trained by `models.digits_cnn`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.digits import DigitsData
from models.seeding import seeded
from models.zoo_model import ZooModel, classifier_zoo_model

MLP_SEED = 0
LENET_SEED = 1


class MLP(nn.Module):
    """784-512-256-10 with ReLU, the network of the classic magnitude-pruning examples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(512, 256)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(256, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Maps (N, 784) images to (N, 10) logits."""
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(input)))))


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling, on 1x28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Maps (N, 1, 28, 28) images to (N, 10) logits."""
        return self.classifier(torch.flatten(self.features(input), 1))


class DigitsCNN(nn.Module):
    """Two conv-BatchNorm-ReLU layers, a max pool and a linear classifier, on 1x8x8 digits.

    The convolutions keep their biases on purpose: a conv bias followed by BatchNorm is a case
    the folding passes must handle.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Maps (N, 1, 8, 8) images to (N, 10) logits."""
        features = self.relu1(self.bn1(self.conv1(input)))
        features = self.pool(self.relu2(self.bn2(self.conv2(features))))
        return self.fc(torch.flatten(features, 1))


def build_mlp() -> ZooModel:
    """Returns the seeded random MLP on flattened 28x28 digits."""
    with seeded(MLP_SEED):
        model = MLP()
    description = "MLP 784-512-256-10 with ReLU, seeded random weights, digits upsampled to 28x28"
    return classifier_zoo_model("mlp", description, model, DigitsData("flat28"))


def build_lenet() -> ZooModel:
    """Returns the seeded random LeNet-5 on 1x28x28 digits."""
    with seeded(LENET_SEED):
        model = LeNet()
    description = "LeNet-5 (conv, max pool, fc 120-84-10), seeded random weights, 1x28x28 digits"
    return classifier_zoo_model("lenet", description, model, DigitsData("image28"))
