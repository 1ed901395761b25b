"""Benchmark models: standard architectures written here (no torchvision), plus the
robust CIFAR-10 ResNet-18 that ships inside pyautoattack (loaded from its own
files, never downloaded).

Names (``MODELS``):

- ``smallcnn``:       fastadv.models.SmallCNN on 1x28x28 (MNIST size)
- ``smallcnn-digits``: the same on 1x8x8 (scikit-learn digits size)
- ``linear``:         flatten + one linear layer on 3x32x32: the update-bound case
- ``resnet18``:       ResNet-18, CIFAR variant (3x3 stem, no max-pool), 3x32x32
- ``wrn-28-10``:      WideResNet-28-10 (pre-activation, Zagoruyko & Komodakis), 3x32x32
- ``resnet50``:       ResNet-50, ImageNet variant (7x7 stem, max-pool, bottlenecks), 3x224x224
- ``robust-resnet18``: pyautoattack/examples/model_test.pt with pyautoattack/examples/resnet.py
- ``digits-cnn``:     fastadv.models.SmallCNN trained here with PGD-AT (eps 0.2) on
                      scikit-learn's digits, attacked on the digits test split at eps 0.2

Weights are random (seeded) except for robust-resnet18 and digits-cnn; timings do not
depend on them, but agreement between fast and exact mode does: that is what the
two trained models are for. Inputs are random images labelled with the model's own
predictions (every point starts correctly classified), except digits-cnn: real test
images with their true labels.
"""
import dataclasses
import importlib.util
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- ResNet (He et al., 2016) ----------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, stride 1) or an ImageNet stem (7x7/2 conv + 3x3/2 max-pool)."""

    def __init__(self, block, num_blocks, num_classes=10, stem="cifar"):
        super().__init__()
        self.in_planes = 64
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(out).flatten(1))


def resnet18_cifar(num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, stem="cifar")


def resnet50_imagenet(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem="imagenet")


# -- WideResNet (Zagoruyko & Komodakis, 2016), as used by RobustBench -------------------------


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen_factor=10, num_classes=10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        blocks = []
        in_planes = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(in_planes, width, stride if i == 0 else 1))
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn_28_10(num_classes=10):
    return WideResNet(28, 10, num_classes)


# -- small models ---------------------------------------------------------------------------


class LinearModel(nn.Module):
    """Flatten and one linear layer: forward and backward cost little, so the update dominates."""

    def __init__(self, in_features=3 * 32 * 32, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def digits_cnn(epochs=10):
    """SmallCNN adversarially trained (PGD-10 AT, eps 0.2) on the digits train split, on the CPU."""
    from fastadv.data import load_digits
    from fastadv.models import SmallCNN
    from fastadv.train import TrainConfig, fit

    (x, y), _ = load_digits(seed=0)
    model = SmallCNN()
    fit(model, x, y, TrainConfig(method="pgd", eps=0.2, steps=10), epochs=epochs, seed=0)
    return model


def digits_test(batch, seed):
    """The digits test split (449 images) and its labels, repeated to batch rows."""
    from fastadv.data import load_digits

    _, (x, y) = load_digits(seed=0)
    reps = -(-batch // len(y))
    return x.repeat(reps, 1, 1, 1)[:batch], y.repeat(reps)[:batch]


def small_cnn(image_size):
    from fastadv.models import SmallCNN

    return SmallCNN(in_channels=1, n_classes=10, width=16, image_size=image_size)


# -- pyautoattack's robust CIFAR-10 ResNet-18 -------------------------------------------------


def pyautoattack_examples_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pyautoattack is not installed (pip install --no-deps pyautoattack==0.2.0)")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "examples"


def robust_resnet18():
    """pyautoattack's example robust ResNet-18 (CIFAR-10), from the files in its wheel."""
    examples = pyautoattack_examples_dir()
    weights = examples / "model_test.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing from the pyautoattack install")
    spec = importlib.util.spec_from_file_location("_pyautoattack_examples_resnet", examples / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ResNet18()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


# -- registry ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: object  # () -> nn.Module
    input_shape: tuple  # (C, H, W)
    num_classes: int
    batch_gpu: int  # default batch on CUDA
    batch_quick: int  # default batch with --quick (small CPU sizes)
    batch_cpu: int  # default batch on the CPU without --quick
    eps: float = 8 / 255  # Linf budget of the attacks (their step sizes scale with it)
    data: object = None  # (batch, seed) -> (x, y) real inputs and labels; None: random, labelled by the model


MODELS = {
    "smallcnn": ModelSpec(lambda: small_cnn(28), (1, 28, 28), 10, 1024, 128, 256),
    "smallcnn-digits": ModelSpec(lambda: small_cnn(8), (1, 8, 8), 10, 1024, 128, 512),
    "linear": ModelSpec(lambda: LinearModel(3 * 32 * 32, 10), (3, 32, 32), 10, 1024, 1024, 1024),
    "resnet18": ModelSpec(lambda: resnet18_cifar(10), (3, 32, 32), 10, 256, 8, 32),
    "wrn-28-10": ModelSpec(lambda: wrn_28_10(10), (3, 32, 32), 10, 128, 2, 8),
    "resnet50": ModelSpec(lambda: resnet50_imagenet(1000), (3, 224, 224), 1000, 64, 2, 8),
    "robust-resnet18": ModelSpec(robust_resnet18, (3, 32, 32), 10, 256, 8, 32),
    "digits-cnn": ModelSpec(digits_cnn, (1, 8, 8), 10, 1024, 128, 449, eps=0.2, data=digits_test),
}


def build(name, device="cpu", seed=0):
    """The named model on device in eval mode, its weights drawn from a fixed seed."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name].build()
    return model.to(device).eval()
