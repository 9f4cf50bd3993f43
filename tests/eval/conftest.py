"""Fixtures of the eval tests."""
from unittest import mock

import pytest
import torch

from tests.helpers import INCEPTION_FILE


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A torch hub cache holding torch-fidelity's Inception file, with the right architecture and
    random (He-initialised) weights, under the name torch-fidelity downloads it to."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    home = tmp_path_factory.mktemp("torch_home")
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("build-test-weights", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt / INCEPTION_FILE)
    return home
