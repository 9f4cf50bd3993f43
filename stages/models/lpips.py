"""LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018), frozen, and where its weights come from: the
decoder's perceptual loss (the same network and weights as the reference, which uses taming-
transformers' copy of them) and ``rae eval --pairs``'s perceptual distance."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .weights import MissingWeightsError, WeightsFileError, load_state_dict_file, reachable

# torchvision's VGG16 IMAGENET1K_V1 weights, cached by torch hub under $TORCH_HOME/hub/checkpoints.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
# LPIPS v0.1 linear layers; shipped inside the `lpips` package as lpips/weights/v0.1/vgg.pth.
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# VGG16 ("configuration D") convolution widths, "M" = 2x2 max-pool; torchvision's layer indices.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (4, 9, 16, 23, 30)  # LPIPS compares relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = features[:end]
_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers, c_in = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


def load_vgg16_state_dict(weights: str | os.PathLike | None = None, flag: str = "--lpips-vgg-weights",
                          offline: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 ImageNet weights: ``weights`` if given, else the torch hub cache
    ($TORCH_HOME/hub/checkpoints/vgg16-397923af.pth, downloaded there on first use unless ``offline``)."""
    if weights is not None:
        return load_state_dict_file(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not cached.is_file():
        try:
            if offline:
                raise ConnectionError("offline")
            if not reachable(VGG16_URL):
                raise ConnectionError("cannot reach the download host")
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix="397923af", progress=False)
        except Exception:
            raise MissingWeightsError(
                f"LPIPS needs the VGG16 weights {VGG16_FILE}, not in {cached.parent} and not downloadable: "
                f"fetch {VGG16_URL} and put it there (or pass it with {flag} FILE)") from None
    return load_state_dict_file(cached)


def load_lpips_lin_state_dict(weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The LPIPS v0.1 VGG linear layers: ``weights`` if given, else the copy inside the lpips package."""
    if weights is None:
        spec = importlib.util.find_spec("lpips")
        path = Path(next(iter(spec.submodule_search_locations))) / "weights/v0.1/vgg.pth" if spec else None
        if path is None or not path.is_file():
            raise MissingWeightsError(
                f"LPIPS linear-layer weights vgg.pth not found (install the lpips package, or fetch "
                f"{LPIPS_LIN_URL} and pass the file)")
        weights = path
    return load_state_dict_file(weights)


class LPIPS(nn.Module):
    """LPIPS(VGG) distance, frozen: images in [0, 1] -> per-sample distance [B] (average it for the loss).

    Unit-normalised VGG16 features at five depths, squared differences weighted per channel by the
    learned linear layers, averaged over space and summed over depths (Zhang et al. 2018, v0.1).
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None,
                 pretrained: bool = True, flag: str = "--lpips-vgg-weights", offline: bool = False):
        super().__init__()
        self.vgg = _vgg16_features()[: _TAPS[-1]]
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS])
        # LPIPS's input scaling of [-1, 1] images (close to ImageNet mean/std).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self._load(load_vgg16_state_dict(vgg_weights, flag, offline), load_lpips_lin_state_dict(lin_weights))
        self.eval().requires_grad_(False)

    def _load(self, vgg: dict[str, torch.Tensor], lin: dict[str, torch.Tensor]) -> None:
        # torchvision names the trunk "features.<i>.*"; the lpips package "lin<k>.model.1.weight".
        vgg = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        lin = {f"{m.group(1)}.weight": v for k, v in lin.items()
               if (m := re.fullmatch(r"lin(\d)\.model\.1\.weight", k))}
        for part, state in ((self.vgg, vgg), (self.lins, lin)):
            want = part.state_dict()
            bad = [k for k, v in want.items() if k not in state or state[k].shape != v.shape]
            if bad:
                what = "VGG16 features" if part is self.vgg else "LPIPS v0.1 linear layers"
                raise WeightsFileError(f"LPIPS weights are not {what}: missing or misshapen {bad[:3]}")
            part.load_state_dict({k: state[k] for k in want})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale  # one pass for both images
        start, dist = 0, 0
        for end, lin in zip(_TAPS, self.lins):
            h = self.vgg[start:end](h)
            start = end
            f = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length per position
            dist = dist + lin((f[:n] - f[n:]).square()).mean(dim=(1, 2, 3))
        return dist
