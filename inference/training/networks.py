"""3D U-Net with an image head (synthetic T1, 0..1) and a segmentation head (logits)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("instance", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels, momentum=0.05)
    raise ValueError(f"unknown normalisation {kind!r} (one of {NORMS})")


def _conv(in_ch: int, out_ch: int, norm: str) -> list[nn.Module]:
    return [nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch), nn.LeakyReLU(0.1, inplace=True)]


def _block(in_ch: int, out_ch: int, convs: int = 2, norm: str = "batch") -> nn.Sequential:
    layers = _conv(in_ch, out_ch, norm)
    for _ in range(convs - 1):
        layers += _conv(out_ch, out_ch, norm)
    return nn.Sequential(*layers)


class SynthUNet(nn.Module):
    """U-Net with `levels` resolutions; spatial sizes must be divisible by 2 ** (levels - 1).

    forward(x [N,1,D,H,W]) -> (t1 [N,1,D,H,W] in 0..1, seg logits [N,n_labels,D,H,W]).

    Channels double per level up to `max_channels`. With `light_top` the full-resolution (1 mm) level has one
    convolution in the encoder and one in the decoder instead of two each: most of the cost of a 3D U-Net is at
    full resolution, and on CPUs the saved time buys larger crops (more context, e.g. to tell left from right).
    Normalisation (`norm`): "instance" normalises each feature map of each input by its own statistics, the
    same in training and at inference; it absorbs the random contrast and intensity scale of the generated
    inputs, at the price of a (small) dependence of the output on the tile extent. "batch" (older checkpoints)
    uses running statistics in eval mode and the ONNX export folds it into the convolutions; with batch size 1
    the running statistics of randomly contrasted samples fit no single input (docs/training.md).
    """

    def __init__(self, n_labels: int = 33, base: int = 8, levels: int = 4, max_channels: int = 64,
                 light_top: bool = False, norm: str = "batch") -> None:
        super().__init__()
        self.levels = levels
        chans = [min(max_channels, base * 2**i) for i in range(levels)]
        top_convs = 1 if light_top else 2
        self.down = nn.ModuleList()
        in_ch = 1
        for i, ch in enumerate(chans):
            self.down.append(_block(in_ch, ch, top_convs if i == 0 else 2, norm))
            in_ch = ch
        self.up_conv = nn.ModuleList()
        self.up_block = nn.ModuleList()
        for i in range(levels - 1, 0, -1):
            self.up_conv.append(nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2))
            self.up_block.append(_block(2 * chans[i - 1], chans[i - 1], top_convs if i == 1 else 2, norm))
        self.image_head = nn.Conv3d(chans[0], 1, 1)
        self.seg_head = nn.Conv3d(chans[0], n_labels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in (self.image_head, self.seg_head):  # start from uniform class probabilities, image 0.5
            nn.init.normal_(head.weight, std=0.01)

    def heads(self) -> list[nn.Parameter]:
        """Parameters of the two 1 x 1 x 1 output heads (trained with a larger learning rate)."""
        return [*self.image_head.parameters(), *self.seg_head.parameters()]

    @property
    def divisible_by(self) -> int:
        return 2 ** (self.levels - 1)

    def freeze_normalization(self) -> None:
        """Batch norm layers use (and keep) their running statistics from now on, also in train mode."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's last feature map (what the heads read), at the input's resolution."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up_conv, self.up_block, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return torch.sigmoid(self.image_head(h)), self.seg_head(h)


class CoarseSynthNet(nn.Module):
    """A U-Net that works at 2 mm inside a 1 mm graph: 1 mm in, 1 mm out.

    forward(x [N,1,D,H,W] at 1 mm): 2 × 2 × 2 average pooling -> SynthUNet at 2 mm -> image logit and
    segmentation logits upsampled (trilinear) to 1 mm -> (t1 in 0..1, seg logits), as the node's pipeline expects.
    D, H, W must be divisible by 2 ** levels (`divisible_by`). Training calls `core` directly on 2 mm tensors
    (the pooling is done by the data pipeline), so no 1 mm tensor is ever differentiated.

    Why: on the CPUs this project trains on, the backward pass of full-resolution 3D convolutions is most of the
    cost. At 2 mm a step costs about an eighth, so a crop eight times the volume (context to tell left from right
    and to see the whole head) fits in the same hours. The price: the synthetic T1 has 2 mm detail (resampled to
    the 1 mm grid) and small structures have coarser boundaries; the model card states it.
    """

    def __init__(self, n_labels: int = 33, base: int = 8, levels: int = 4, max_channels: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        self.core = SynthUNet(n_labels=n_labels, base=base, levels=levels, max_channels=max_channels, norm=norm)

    @property
    def divisible_by(self) -> int:
        return 2 * self.core.divisible_by

    def freeze_normalization(self) -> None:
        self.core.freeze_normalization()

    def heads(self) -> list[nn.Parameter]:
        return self.core.heads()

    def forward_coarse(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t1 in 0..1, seg logits), both at 2 mm, from a 2 mm input: what training takes."""
        return self.core(x2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.core.features(F.avg_pool3d(x, 2))
        image_logit = F.interpolate(self.core.image_head(h), scale_factor=2, mode="trilinear", align_corners=False)
        seg = F.interpolate(self.core.seg_head(h), scale_factor=2, mode="trilinear", align_corners=False)
        return torch.sigmoid(image_logit), seg


def build_network(config: dict) -> nn.Module:
    """The network a checkpoint's `config` describes (`arch`: "unet" at 1 mm, "coarse" at 2 mm inside)."""
    config = dict(config)
    arch = config.pop("arch", "unet")
    if arch == "coarse":
        return CoarseSynthNet(**config)
    if arch == "unet":
        return SynthUNet(**config)
    raise ValueError(f"unknown network architecture {arch!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
