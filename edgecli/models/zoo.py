"""Edge-sized image/feature classifiers, written here (no torchvision dependency)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _c(ch: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (kernels like multiples of 8)."""
    return max(divisor, int(ch + divisor / 2) // divisor * divisor)


def _image_shape(input_shape: list[int], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image input [C, H, W], got {input_shape}")
    return tuple(input_shape)  # type: ignore[return-value]


class MLP(nn.Module):
    def __init__(self, input_shape, num_classes, hidden=(256, 64), dropout=0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = int(h)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2 if isinstance(k, int) else (k[0] // 2, k[1] // 2), groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CNN(nn.Module):
    """Three 3x3 conv blocks, one 2x2 pool, global average pool, linear head."""

    def __init__(self, input_shape, num_classes, channels=(32, 64, 64), dropout=0.1):
        super().__init__()
        c, h, w = _image_shape(input_shape, "cnn")
        c1, c2, c3 = (int(v) for v in channels)
        self.features = nn.Sequential(
            _conv_bn(c, c1),
            _conv_bn(c1, c2),
            nn.MaxPool2d(2) if min(h, w) >= 4 else nn.Identity(),
            _conv_bn(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8 of MLPerf Tiny (image classification): 16-32-64 filters, three residual stacks."""

    def __init__(self, input_shape, num_classes, width=1.0):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "resnet8")
        f = [_c(16 * width, 4), _c(32 * width, 4), _c(64 * width, 4)]
        self.stem = _conv_bn(c, f[0])
        self.stage1 = _ResBlock(f[0], f[0], 1)
        self.stage2 = _ResBlock(f[0], f[1], 2)
        self.stage3 = _ResBlock(f[1], f[2], 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(f[2], num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.stage3(self.stage2(self.stage1(self.stem(x))))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with a width multiplier, as used by MLPerf Tiny visual wake words."""

    # expansion t, channels c, repeats n, stride s
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, input_shape, num_classes, width=0.35, last_channels=1280, dropout=0.2):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "mobilenet")
        cin = _c(32 * width)
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(c, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))
        ]
        for t, ch, n, s in self.SETTINGS:
            cout = _c(ch * width)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _c(last_channels * max(1.0, width))
        layers.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class DSCNN(nn.Module):
    """Depthwise-separable CNN (MLPerf Tiny keyword spotting), for spectrogram-like or small images."""

    def __init__(self, input_shape, num_classes, channels=64, blocks=4, dropout=0.2):
        super().__init__()
        c, h, w = _image_shape(input_shape, "dscnn")
        stride = 2 if min(h, w) >= 16 else 1
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(c, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        ]
        for _ in range(int(blocks)):
            layers += [_conv_bn(channels, channels, 3, 1, groups=channels), _conv_bn(channels, channels, 1)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class DPCNN(nn.Module):
    """A small CNN made for DP-SGD: GroupNorm instead of BatchNorm (no statistics across the samples
    of a batch, which per-sample clipping cannot bound) and tanh instead of ReLU (bounded activations
    keep clipped, noised gradients informative: Papernot et al., "Tempered Sigmoid Activations for
    Deep Learning with Differential Privacy", AAAI 2021). Two 3x3 conv blocks, each pooled 2x2, then
    one linear layer on the flattened features: about 6k parameters on 8x8 digits, few enough for
    DP-SGD's noise to average out over a thousand samples."""

    def __init__(self, input_shape, num_classes, channels=(16, 32), groups=1):
        super().__init__()
        c, h, w = _image_shape(input_shape, "dpcnn")
        layers: list[nn.Module] = []
        if int(groups) < 1:
            raise ValueError(f"dpcnn: groups must be a positive number of GroupNorm groups, got {groups}")
        for cout in (int(v) for v in channels):
            if cout < 1:
                raise ValueError(f"dpcnn: channels must be positive, got {cout}")
            if cout % int(groups):
                raise ValueError(f"dpcnn: groups={groups} does not divide {cout} channels")
            pool = min(h, w) >= 2
            layers += [nn.Conv2d(c, cout, 3, 1, 1), nn.GroupNorm(int(groups), cout), nn.Tanh()]
            if pool:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: list[int]) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (conv and linear layers)."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out.numel() * k)

    def lin_hook(m, inp, out):
        nonlocal total
        total += int(out.numel() * m.in_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total
