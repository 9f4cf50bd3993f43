"""Loading pretrained weights without ever running code from a file.

Every pretrained network rae uses (the representation encoder, the DINO discriminator, the
LPIPS VGG, the FID Inception) comes through one of two doors:

* a timm registry name, downloaded and cached exactly as timm does (Hugging Face hub cache),
* an explicit local file (``.safetensors`` or a ``torch.save`` file read with
  ``weights_only=True``).

When neither works (typically: a machine without network and an empty cache) the caller gets
a :class:`MissingWeightsError` whose message is one line naming the file and where to put it.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..digests import sha256_file
from ..errors import RaeError
from .discriminator import DINO_TIMM_NAME, DinoDiscriminator


class MissingWeightsError(RaeError):
    """Raised when pretrained weights are neither cached nor downloadable nor given as a file."""


class WeightsFileError(RaeError):
    """Raised when a weights file exists but cannot be read (corrupt, truncated, wrong format)."""


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Content digest of a state dict (names, dtypes, shapes and bytes), independent of file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_torch_file(path: str | os.PathLike) -> Any:
    """A safetensors file, or a ``torch.save`` file read with ``weights_only=True`` (tensors and plain
    containers, never code), as it is. Every failure is one line: missing (MissingWeightsError),
    truncated or corrupt, or holding pickled Python objects (WeightsFileError)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():  # torch's notes on pickle protocols would break the one-line error
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:  # the weights-only unpickler met a reference to a Python callable or class
            raise WeightsFileError(f"refusing {path}: it holds pickled Python objects ({code.group(1)}), which "
                                   "could run code when loaded; rae reads checkpoints with weights_only=True only") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()] or ["unexpected end of file"]
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0])[:160]
        kind = "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"
        raise WeightsFileError(f"cannot read {path}: not a complete {kind}, truncated or corrupt "
                               f"({type(e).__name__}: {detail})") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (``read_torch_file``) as one flat state dict.

    Common wrappers (``{"model": ...}``, ``{"state_dict": ...}``, ``{"ema": ...}``) are unwrapped.
    """
    state = read_torch_file(path)
    for key in ("model", "state_dict", "ema", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path} does not hold a flat dictionary of tensors")
    return state


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection within ``timeout`` seconds (name lookup
    included). Checked before a download, so that a machine without network says at once which file
    to fetch, instead of after the downloaders' retries."""
    import socket
    import threading
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True") and "huggingface.co" in url:
        return False
    host = urllib.parse.urlparse(url).hostname
    answer = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(answer)


HF_SCHEME = "hf://"


def is_hf(path: str | os.PathLike | None) -> bool:
    """``hf://OWNER/REPO/FILE`` (a path option may have folded the "//" into "/")."""
    return path is not None and str(path).startswith(("hf://", "hf:/"))


def hf_name(path: str | os.PathLike) -> str:
    """The canonical ``hf://OWNER/REPO/FILE`` of an hf:// path (a path option may have folded "//" into "/")."""
    return HF_SCHEME + str(path).split(":", 1)[1].lstrip("/")


def hf_file(spec: str | os.PathLike, offline: bool = False) -> str:
    """``hf://OWNER/REPO/PATH/IN/REPO`` -> the file in the Hugging Face cache, downloaded into it first
    when it is not there (``huggingface_hub``, as timm's weights; ``offline`` or HF_HUB_OFFLINE=1: the
    cache only). One line naming the file, its address and the cache when it cannot be had."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    rest = hf_name(spec)[len(HF_SCHEME):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise RaeError(f"{spec}: a Hugging Face file is hf://OWNER/REPO/PATH (e.g. "
                       "hf://nyu-visionx/RAE-collections/<file>)")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    url = hf_download_hint(repo, filename)
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached
    where = f"{HF_HUB_CACHE}/models--{repo.replace('/', '--')}"
    if offline or not reachable(url):
        raise MissingWeightsError(f"{HF_SCHEME}{rest} is not in the Hugging Face cache ({where}) and cannot be "
                                  f"downloaded here: download {url} and give its local path instead")
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # not found, gated, network: one line
        raise MissingWeightsError(f"cannot download {url} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                  "download it and give its local path instead") from None


def cached_pretrained_file(timm_name: str) -> str | None:
    """The file of ``timm_name``'s pretrained weights in the Hugging Face cache, if it is there."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(timm_name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
        cached = try_to_load_from_cache(hub_id, filename) if hub_id else None
        return cached if isinstance(cached, str) and os.path.isfile(cached) else None
    except Exception:
        return None


def _timm_filter(model: torch.nn.Module):
    """The checkpoint filter timm applies to pretrained weights of ``model``'s architecture."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda state, _model: state)


def hf_download_hint(hf_hub_id: str, filename: str = "model.safetensors") -> str:
    return f"https://huggingface.co/{hf_hub_id}/resolve/main/{filename}"


def create_timm_model(timm_name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
                      flag: str = "--weights", convert=None, **timm_kwargs) -> tuple[torch.nn.Module, str | None]:
    """Build ``timm_name`` and load its pretrained weights; returns ``(model, sha256 of the weights)``.

    ``weights``: a local file (goes through timm's own checkpoint filter, so original DINOv2 /
    SigLIP / MAE checkpoints and position-embedding resampling work as with a download).
    ``convert(state_dict)``: for a local file in a layout timm does not know (e.g. Hugging Face
    transformers), returns the state dict in one it does, or None to leave the file to timm.
    ``pretrained=False``: random initialisation (tests, demonstrations); the digest is then of
    the initialised state dict, so two stores from the same seed still agree.
    """
    import timm

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise MissingWeightsError(f"weights file not found: {weights}")
        converted = None
        if weights.suffix != ".safetensors" or convert is not None:
            # timm reads .pth/.bin with weights_only=True itself; read it here for a clear error.
            state = load_state_dict_file(weights)
            converted = convert(state) if convert is not None else None
        try:
            if converted is not None:  # timm's own filter (position-embedding resampling) on it
                model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
                model.load_state_dict(_timm_filter(model)(converted, model))
            else:
                model = timm.create_model(timm_name, pretrained=True,
                                          pretrained_cfg_overlay=dict(file=str(weights)), **timm_kwargs)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsFileError(f"cannot load {weights} into timm model {timm_name}: {msg[:300]}") from None
        return model, sha256_file(weights)

    if not pretrained:
        model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
        return model, sha256_state_dict(model.state_dict())

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    where = hf_download_hint(hub_id, filename) if hub_id else f"the timm weights of {timm_name}"
    cached = cached_pretrained_file(timm_name)
    try:
        if hub_id and cached is None and not reachable(where):
            raise ConnectionError("not cached, and the hub cannot be reached")
        model = timm.create_model(timm_name, pretrained=True, **timm_kwargs)
    except Exception:
        raise MissingWeightsError(
            f"pretrained weights for '{timm_name}' are not cached and cannot be downloaded: fetch {where} "
            f"and pass it with {flag} FILE (or put it in the Hugging Face cache, $HF_HOME/hub)") from None
    cached = cached or cached_pretrained_file(timm_name)  # downloaded just now
    return model, sha256_file(cached) if cached else sha256_state_dict(model.state_dict())


def load_discriminator(weights: str | os.PathLike | None = None, pretrained: bool = True, timm_name: str | None = None,
                       flag: str = "--disc-weights", **heads) -> DinoDiscriminator:
    """The decoder's GAN discriminator: its frozen DINO backbone built with ``create_timm_model`` (a
    local file, the caches, or random with ``pretrained=False``), then the trainable heads (``heads``:
    ``DinoDiscriminator``'s keyword arguments). The backbone is made first, so a random one draws the
    same numbers as before the heads."""
    # tanh-approximated GELU: the reference runs DINO's blocks with it.
    backbone, sha256 = create_timm_model(timm_name or DINO_TIMM_NAME, weights=weights, pretrained=pretrained, flag=flag,
                                         num_classes=0, act_layer="gelu_tanh")
    return DinoDiscriminator(backbone, sha256, **heads)
