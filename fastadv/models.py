"""Small models defined in the project, for digits-size inputs and benchmarks."""
import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 and a linear head; 8x8 single-channel inputs by default."""

    def __init__(self, in_channels=1, n_classes=10, width=16, image_size=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width * ((image_size + 1) // 2) ** 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """Flatten, two hidden ReLU layers, linear head."""

    def __init__(self, in_features=64, n_classes=10, hidden=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.net(x)


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs=10, batch_size=64, lr=1e-2, seed=0):
    """Plain (non-adversarial) training with Adam; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
