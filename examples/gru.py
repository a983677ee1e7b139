"""A GRU sequence classifier: embeds (N, T, D) features, runs a GRU, classifies the last step."""

import torch
import torch.nn as nn


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, layers: int = 1, num_classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.gru(torch.relu(self.proj(x)))
        return self.head(self.norm(out[:, -1]))


def build_model():
    return GRUClassifier()


def example_inputs():
    return (torch.randn(8, 32, 16),)
