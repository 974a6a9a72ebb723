"""LPIPS (Zhang et al. 2018, arXiv 1801.03924), VGG16 trunk, built only from files already on disk.

Two files are needed and neither is ever downloaded here:
  * the VGG16 ImageNet trunk, torchvision's `vgg16-397923af.pth`, looked up where torch.hub caches it
    ($TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/);
  * LPIPS's five linear heads (`weights/v0.1/vgg.pth`), which the `lpips` PyPI package ships
    (`pip install lpips`, or the project's `perceptual` extra).
When one is missing or unreadable, building LPIPS raises `LPIPSWeightsError`, naming the file and how to get
it: a run configured with a perceptual loss never trains silently without it (set
`tokenizer.loss.perceptual=0` to train without LPIPS on purpose).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, as torch.hub caches it
# torchvision's vgg16 `features`: conv widths, "M" = 2x2 max pool; every conv is followed by a ReLU.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling (v0.1): images in [-1, 1] -> roughly ImageNet-normalized.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
OFF = "or set tokenizer.loss.perceptual=0 to train without LPIPS"
GET_BACKBONE = ("get it on a machine with internet access with `python -c \"import torchvision; "
                "torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` (torch.hub caches it as "
                f"$TORCH_HOME/hub/checkpoints/{VGG16_FILE}) and copy it here, or pass LPIPS(backbone_path=...)")
GET_HEADS = "install the `lpips` package (`pip install lpips`, or the project's `perceptual` extra)"


class LPIPSWeightsError(FileNotFoundError):
    """LPIPS was asked for but its weights are not on disk (or cannot be read)."""


def default_backbone_path() -> Path:
    """Where torch.hub keeps torchvision's VGG16 weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def default_heads_path() -> Path | None:
    """The linear heads shipped inside the `lpips` package, or None when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def vgg16_features() -> nn.Sequential:
    """VGG16's conv trunk with torchvision's layer indices (so its `features.N.*` keys load as they are)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


def _unit_channels(h: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each pixel's feature vector to unit length: (B, C, H, W) -> (B, C, H, W)."""
    return h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Perceptual distance of images in [-1, 1]: (B, C, H, W) x 2 -> (B,); frozen; raises without its weights."""

    def __init__(self, backbone_path: str | Path | None = None, heads_path: str | Path | None = None):
        super().__init__()
        self.backbone_path = Path(backbone_path) if backbone_path else default_backbone_path()
        heads = Path(heads_path) if heads_path else default_heads_path()
        if not self.backbone_path.is_file():
            raise LPIPSWeightsError(f"LPIPS needs the VGG16 ImageNet trunk at {self.backbone_path}, which does not "
                                    f"exist (nothing is downloaded here): {GET_BACKBONE}; {OFF}")
        if heads is None or not heads.is_file():
            where = heads or "<the lpips package>, which is not installed"
            raise LPIPSWeightsError(f"LPIPS needs its linear heads (weights/v0.1/vgg.pth) from {where}: {GET_HEADS}; "
                                    f"{OFF}")
        features = vgg16_features()
        lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        try:
            trunk = torch.load(self.backbone_path, map_location="cpu", weights_only=True)
            features.load_state_dict({k[len("features."):]: v for k, v in trunk.items() if k.startswith("features.")})
            lin_state = torch.load(heads, map_location="cpu", weights_only=True)  # saved from CUDA tensors
            for i, lin in enumerate(lins):
                lin.weight.data.copy_(lin_state[f"lin{i}.model.1.weight"])
        except Exception as e:  # a corrupt or foreign file: say which and why
            raise LPIPSWeightsError(f"LPIPS weights at {self.backbone_path} / {heads} could not be loaded ({e}); "
                                    f"replace them ({GET_BACKBONE}; heads: {GET_HEADS}), {OFF}") from e
        self.features = features[:TAPS[-1] + 1]  # nothing after relu5_3 is used
        self.lins = lins
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, in eval mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, C, H, W) in [-1, 1], C in {1, 3} -> distance (B,); gradients flow to x and y."""
        b = x.shape[0]
        h = torch.cat([x, y]).float()  # one pass for both: (2B, C, H, W)
        if h.shape[1] == 1:
            h = h.expand(-1, 3, -1, -1)  # gray -> RGB
        h = (h - self.shift) / self.scale
        dist = h.new_zeros(b)
        taps = iter(zip(TAPS, self.lins))
        tap, lin = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                fx, fy = _unit_channels(h).split(b)  # (B, C_l, H_l, W_l) each
                dist = dist + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # 1x1 head, spatial mean -> (B,)
                tap, lin = next(taps, (None, None))
        return dist
