"""A plain multi-layer perceptron for 8x8 digit images (64 features, 10 classes)."""

import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 128, depth: int = 4, num_classes: int = 10):
        super().__init__()
        layers, width = [], features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


def build_model():
    return MLP()


def example_inputs():
    return (torch.randn(16, 64),)
