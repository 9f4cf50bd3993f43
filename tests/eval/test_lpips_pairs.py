"""`rae eval --pairs` reports LPIPS (VGG, v0.1), the number the paper's rFID tables put beside PSNR and
SSIM: equal to the `lpips` package's on the same weights (a random VGG16 written to a file here, the
package's own linear layers), skipped with a reason when the VGG16 weights are not at hand."""
import numpy as np
import pytest
import torch
import torchvision

from stages.eval.evaluate import EvalConfig, run
from tests.helpers import smooth_images, write_folder


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return path


def _theirs(vgg_file, a: np.ndarray, b: np.ndarray) -> float:
    import lpips

    net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(vgg_file, weights_only=True)
    for k in range(1, 6):
        part = getattr(net.net, f"slice{k}")
        for name, module in part.named_children():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.data.copy_(state[f"features.{name}.weight"])
                module.bias.data.copy_(state[f"features.{name}.bias"])
    x, y = (torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255.0 for v in (a, b))
    with torch.no_grad():
        return net(x, y, normalize=True).flatten().double().mean().item()


def test_pairs_lpips_equals_the_lpips_package(vgg_file, tmp_path):
    a, b = smooth_images(6, 64, seed=1), smooth_images(6, 64, seed=2)
    ours = run(EvalConfig(images=str(write_folder(tmp_path / "a", a)), ref=str(write_folder(tmp_path / "b", b)),
                          pairs=True, metrics=("lpips",), lpips_vgg_weights=str(vgg_file), num_workers=0,
                          device="cpu", out=str(tmp_path / "e.json")))
    theirs = _theirs(vgg_file, a, b)
    # float32 on both sides, the same operations in a different order: a few ulps of the sums.
    assert abs(ours["metrics"]["lpips"] - theirs) <= 1e-5 * abs(theirs) + 1e-7
    assert {"psnr", "ssim", "lpips"} <= set(ours["metrics"])
    same = run(EvalConfig(images=str(tmp_path / "a"), ref=str(tmp_path / "a"), pairs=True, metrics=("lpips",),
                          lpips_vgg_weights=str(vgg_file), num_workers=0, device="cpu", out=str(tmp_path / "s.json")))
    assert same["metrics"]["lpips"] == 0.0


def test_pairs_without_vgg_weights_skip_lpips_with_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    a = smooth_images(3, 32, seed=1)
    result = run(EvalConfig(images=str(write_folder(tmp_path / "a", a)), ref=str(tmp_path / "a"), pairs=True,
                            metrics=("lpips",), offline=True, num_workers=0, device="cpu", out=str(tmp_path / "e.json")))
    assert "lpips" not in result["metrics"] and "vgg16-397923af.pth" in result["skipped"]["lpips"]
    assert result["metrics"]["psnr"] == 100.0
