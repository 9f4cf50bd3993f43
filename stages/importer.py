"""``rae import``: the paper's released files -> rae artifacts that ``rae sample`` and ``rae decode`` use as they are.

The authors release (Hugging Face ``nyu-visionx/RAE-collections``, written by github.com/bytetriper/RAE)
three kinds of files, each converted into what the rae stage of the same role writes:

    decoder    ``model.pt``: the ViT decoder's weights        -> a decoder run (as ``rae train-decoder``)
    stats      ``stat.pt``: latent ``mean`` / ``var`` [C, h, w] -> DIR/latent_stats.safetensors, the
                                                                file a diffusion run carries
    diffusion  ``stage2_model.pt``: LightningDiT / DiT^DH        -> a diffusion run (as ``rae train-diffusion``)

A file may also be one of the authors' training checkpoints (``{"model", "ema", "optimizer", ...}``,
for the decoder a whole RAE under ``decoder.``) or carry DDP / compile prefixes. Its EMA weights
(what the paper samples and decodes with) become the run's EMA weights; a plain state dict is taken
to be them. The architecture comes from the tensors' shapes; the one number shapes cannot give,
the decoder's attention heads, is the reference config's for that width.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers, never code.
Everything is read and checked before the output is touched, and a run directory's manifest says
``"complete": true`` only after its last file is written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts.manifest import claim_output, has_manifest, new_manifest, read_manifest, verify_files
from .artifacts.outputs import stage
from .artifacts.runs import (DECODER_EMA, DECODER_RAW, DIFFUSION_EMA, DIFFUSION_RAW, NORM_EPS, STATS,
                             decoder_config, diffusion_config, finish_run, training_shift)
from .digests import sha256_file
from .errors import RaeError
from .models import decoder as decoder_model
from .models import dit as dit_model
from .models.encoders import UNKNOWN_DIGEST, encoder_identity, spec_for
from .models.weights import MissingWeightsError, cached_pretrained_file, hf_file, hf_name, is_hf, read_torch_file
from .options import option

KINDS = ("decoder", "stats", "diffusion")


@dataclass
class ImportConfig:
    kind: str = option(help="decoder | stats | diffusion.", argument=True)
    source: str = option(help="The released file: model.pt (decoder), stat.pt (stats), stage2_model.pt (diffusion), "
                         "or a training checkpoint of the reference code; a local path or hf://OWNER/REPO/FILE (the "
                         "Hugging Face cache, downloaded into it when needed).", path=True, argument=True)
    out: str = option(help="Output directory: a decoder run, a diffusion run, or a statistics directory "
                      "(latent_stats.safetensors).", short="-o", path=True)
    # The encoder whose latents the models work on (the released models: DINOv2-B with registers).
    encoder: str = option("dinov2-b", "The encoder of the latents: dinov2-b (the released models) | dinov2-s | "
                          "dinov2-l | siglip2-b | mae-b | timm:MODEL_NAME.")
    image_size: int | None = option(None, "Image size of the encoded crops (default: from the token grid, 16x16 -> "
                                    "256 and 32x32 -> 512 for DINOv2).")
    encoder_weights: str | None = option(None, "The encoder's weights file, to record its sha256 as `rae encode "
                                         "--encoder-weights` does (default: the Hugging Face cache's).", path=True)
    # Shapes do not show a decoder's attention heads.
    heads: int | None = option(None, "decoder: attention heads (default: the reference config's for its width, 12 "
                               "for 768, 16 for 1024 and 1152).")
    stats: str | None = option(None, "diffusion: the latent statistics it was trained with (stat.pt, a .safetensors, "
                               "a directory from `rae import stats`, or hf://OWNER/REPO/FILE).", path=True)
    num_heads: int | None = option(None, "diffusion: trunk attention heads (default: from the RoPE tables).")
    head_num_heads: int | None = option(None, "diffusion: DiT^DH head attention heads (default: from the RoPE "
                                        "tables).")
    shift: float | None = option(None, "diffusion: time shift (default: sqrt(C*h*w / 4096), as the reference).")
    shift_base: int = 4096
    offline: bool = option(False, "Never download: hf:// files from the Hugging Face cache only.")
    overwrite: bool = option(False, "Replace an existing output.")
    hf_names: dict | None = option(None, "The hf:// names of the files (set by rae).", cli=False)


def _validate(cfg: ImportConfig) -> None:
    if cfg.kind not in KINDS:
        raise RaeError(f"KIND must be one of {', '.join(KINDS)} (got {cfg.kind!r})")
    only = {"decoder": ("heads",), "diffusion": ("stats", "num_heads", "head_num_heads", "shift")}
    for kind, names in only.items():
        for name in names:
            if getattr(cfg, name) is not None and cfg.kind != kind:
                raise RaeError(f"--{name.replace('_', '-')} is for `rae import {kind}` only")
    if cfg.kind == "stats" and (cfg.image_size is not None or cfg.encoder_weights is not None):
        raise RaeError("statistics carry no encoder: --image-size and --encoder-weights are for decoder and diffusion")
    if cfg.kind == "diffusion" and cfg.stats is None:
        raise RaeError("a diffusion model needs its latent statistics: pass --stats stat.pt "
                       "(or an imported stats directory)")
    if cfg.shift is not None and cfg.shift <= 0 or cfg.shift_base <= 0:
        raise RaeError("--shift and --shift-base must be positive")
    if any(v is not None and v < 1 for v in (cfg.heads, cfg.num_heads, cfg.head_num_heads, cfg.image_size)):
        raise RaeError("--heads, --num-heads, --head-num-heads and --image-size must be at least 1")


#################################################################################
#                          Reading the released files                           #
#################################################################################

def _strip_wrappers(key: str) -> str:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, nested in any order."""
    while True:
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


def weight_sets(obj: Any, path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of a released file: ``{"ema": ...}`` plus ``"raw"`` when a training checkpoint
    holds both its "ema" and "model" weights. A plain state dict (or one under "state_dict", "model",
    "ema" or "module") is the released model, i.e. its EMA weights. Keys lose DDP/compile prefixes."""
    if not isinstance(obj, dict):
        raise RaeError(f"{path} does not hold a state dict (it holds a {type(obj).__name__})")
    if isinstance(obj.get("ema"), dict) and isinstance(obj.get("model"), dict):
        sets = {"ema": obj["ema"], "raw": obj["model"]}
    else:
        inner = next((obj[k] for k in ("ema", "model", "state_dict", "module") if isinstance(obj.get(k), dict)), obj)
        sets = {"ema": inner}
    for name, state in sets.items():
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RaeError(f"{path} does not hold a state dict of tensors")
        sets[name] = {_strip_wrappers(str(k)): v for k, v in state.items()}
    return sets


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As the runs rae trains store them (released weights may be half precision: the cast is exact)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _meta_model(cls: type, kwargs: dict) -> torch.nn.Module:
    """The model without memory (shapes only): enough to check names and shapes of any size."""
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except (AssertionError, ValueError) as e:
        raise RaeError(f"cannot build {cls.__name__}({kwargs}): {e}") from None


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` would succeed: the same names and shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise RaeError(f"{path} does not fit the inferred {what}: {len(missing)} missing, {len(unexpected)} "
                       f"unexpected, {len(wrong)} misshapen tensors (e.g. {first!r})")


def _drop_batch_axis(t: torch.Tensor) -> torch.Tensor:
    """[1, C, h, w] -> [C, h, w] (the statistics module's leading batch axis)."""
    while t.dim() > 3 and t.shape[0] == 1:
        t = t[0]
    return t


def load_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Latent statistics -> (mean, var) float32 [C, h, w] and how a run names the file they came from.

    ``path``: the reference's ``stat.pt`` (``{"mean", "var"}``, [C, h, w] or [1, C, h, w]), a
    safetensors file with ``mean`` / ``var``, or a directory holding ``latent_stats.safetensors``
    (``rae import stats``, or any decoder or diffusion run)."""
    path = Path(path)
    if path.is_dir():
        if has_manifest(path):
            verify_files(path, read_manifest(path, require_complete=False))
        path = path / STATS
        if not path.is_file():
            raise RaeError(f"{path.parent} holds no {STATS} (make one with `rae import stats stat.pt --out DIR`)")
    obj = read_torch_file(path)
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "var")):
        raise RaeError(f"{path} holds no latent statistics (tensors 'mean' and 'var')")
    mean, var = (_drop_batch_axis(obj[k].float()) for k in ("mean", "var"))
    if mean.dim() != 3 or mean.shape != var.shape:
        raise RaeError(f"{path}: mean {list(obj['mean'].shape)} and var {list(obj['var'].shape)} "
                       "are not both [C, h, w]")
    if not (mean.isfinite().all() and var.isfinite().all() and (var >= 0).all()):
        raise RaeError(f"{path}: the statistics hold non-finite values or a negative variance")
    ref = {"kind": "latent-statistics", "path": str(path.resolve()), "content_id": sha256_file(path)}
    return mean.contiguous(), var.contiguous(), ref


#################################################################################
#                               Encoder identity                                #
#################################################################################

def resolve_encoder(cfg: ImportConfig, latent_shape, what: str) -> tuple[dict, int, list[str]]:
    """The encoder identity a store of ``cfg.encoder`` latents records (``rae encode``), checked
    against the model's latent shape; ``rae decode`` and ``rae sample --guide-model`` compare it.

    Its weights digest is that of ``--encoder-weights``, else of the file in the Hugging Face cache
    (the one ``rae encode`` uses), else ``UNKNOWN_DIGEST``, which ``rae decode`` accepts with a note."""
    spec = spec_for(cfg.encoder)
    c, h, w = (int(s) for s in latent_shape)
    image_size = cfg.image_size or round(h * spec.patch_size / spec.input_scale)
    expected = list(spec.latent_shape(image_size))
    if expected != [c, h, w]:
        raise RaeError(f"the {what} works on latents [{c}, {h}, {w}], but encoder {cfg.encoder} at {image_size} px "
                       f"gives {expected}: pass the right --encoder / --image-size")
    notes = []
    if cfg.encoder_weights is not None:
        if not Path(cfg.encoder_weights).is_file():
            raise MissingWeightsError(f"weights file not found: {cfg.encoder_weights}")
        digest = sha256_file(cfg.encoder_weights)
    else:
        cached = cached_pretrained_file(spec.timm_name)
        digest = sha256_file(cached) if cached else UNKNOWN_DIGEST
        if not cached:
            notes.append(f"the {cfg.encoder} weights are not in the Hugging Face cache: their sha256 is recorded as "
                         f"'{UNKNOWN_DIGEST}' (rae decode then assumes the store's {cfg.encoder} weights are the "
                         "same, with a note); pass --encoder-weights FILE to record it")
    return encoder_identity(cfg.encoder, image_size, digest, pretrained=True), image_size, notes


#################################################################################
#                               Output directories                              #
#################################################################################

def _claim_run_dir(out: Path, overwrite: bool) -> None:
    """Make ``out`` an empty directory. An existing artifact is replaced only with --overwrite
    (an interrupted import is simply redone); a folder that is not a rae artifact never is."""
    claim_output(out, overwrite,
                 reuse=lambda old: "replace" if not old.get("complete") and "imported_from" in old else None,
                 different=lambda old: f"{out} already holds {'a complete' if old.get('complete') else 'an unfinished'}"
                                       f" {old.get('kind')}; pass --overwrite to replace it, or choose another --out",
                 foreign=f"{out} exists and is not a rae artifact; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _source_ref(path: str | Path) -> dict:
    """How a run names the released file it was imported from (as ``manifest.input_ref`` an artifact)."""
    return {"kind": "reference-file", "path": str(Path(path).resolve()), "content_id": sha256_file(path)}


def _source_step(obj: Any) -> int | None:
    step = obj.get("step") if isinstance(obj, dict) else None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


#################################################################################
#                                    Decoder                                    #
#################################################################################

def decoder_architecture(state: dict[str, torch.Tensor], heads: int | None = None) -> tuple[dict, str | None]:
    """ViTDecoder keyword arguments (without the pixel mean/std) from our decoder state dict's
    shapes, and the name of the paper's size it is (or None). ``heads``: None takes the reference
    config's number for that width (ViT-B 12, ViT-L and ViT-XL 16)."""
    width, in_dim = state["embed.weight"].shape
    tokens = state["pos_embed"].shape[1] - 1  # slot 0 is the CLS token's
    grid, patch = math.isqrt(tokens), math.isqrt(state["head.weight"].shape[0] // 3)
    if grid * grid != tokens or 3 * patch * patch != state["head.weight"].shape[0]:
        raise RaeError(f"the decoder's {tokens} tokens or {state['head.weight'].shape[0]} outputs per token "
                       "are not a square grid of RGB patches")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = dict(width=int(width), depth=depth, mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]))
    same_width = [s for s in decoder_model.DECODER_SIZES.values() if s["width"] == size["width"]]
    if heads is None:
        if not same_width:
            raise RaeError(f"no reference decoder has width {size['width']}: "
                           "pass its number of attention heads (--heads)")
        heads = same_width[0]["heads"]
    if size["width"] % heads:
        raise RaeError(f"decoder width {size['width']} is not divisible by {heads} heads")
    size["heads"] = heads
    name = next((n for n, s in decoder_model.DECODER_SIZES.items() if s == size), None)
    return dict(in_dim=int(in_dim), grid=grid, patch_size=patch, **size), name


def _decoder_state(ref: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """Reference decoder names -> ours. A whole RAE (or a stage-1 training checkpoint's) keeps only
    its ``decoder.`` part; the frozen encoder's weights are not needed."""
    if any(k.startswith("decoder.") for k in ref):
        ref = {k[len("decoder."):]: v for k, v in ref.items() if k.startswith("decoder.")}
    try:
        return decoder_model.from_reference_state_dict(ref)
    except ValueError as e:
        raise RaeError(f"{path}: {e}") from None


def import_decoder(cfg: ImportConfig) -> dict:
    obj = read_torch_file(cfg.source)
    sets = {name: _float32(_decoder_state(ref, cfg.source)) for name, ref in weight_sets(obj, cfg.source).items()}
    try:
        arch, size_name = decoder_architecture(sets["ema"], cfg.heads)
    except KeyError as e:
        raise RaeError(f"{cfg.source} is not a reference ViT decoder (no {e.args[0]!r})") from None
    latent_shape = [arch["in_dim"], arch["grid"], arch["grid"]]
    encoder, _, notes = resolve_encoder(cfg, latent_shape, "decoder")
    arch.update(image_mean=[float(v) for v in encoder["mean"]], image_std=[float(v) for v in encoder["std"]])
    meta = _meta_model(decoder_model.ViTDecoder, arch)
    for state in sets.values():
        _check_fits(meta, state, cfg.source, "decoder")

    out = Path(cfg.out)
    source = _source_ref(cfg.source)
    image_size = arch["grid"] * arch["patch_size"]
    imported = {"source": source["path"], "sha256": source["content_id"], "weights": sorted(sets),
                "step": _source_step(obj)}
    config = decoder_config(arch, size_name, encoder, latent_shape, imported_from=imported)
    manifest = new_manifest("decoder-run", cfg, inputs={"source": source}, imported_from=imported, encoder=encoder,
                            latent_shape=latent_shape, decoder=arch, image_size=image_size,
                            **({"steps": imported["step"]} if imported["step"] is not None else {}))
    files = {DECODER_EMA: sets["ema"], **({DECODER_RAW: sets["raw"]} if "raw" in sets else {})}
    _claim_run_dir(out, cfg.overwrite)
    finish_run(out, manifest, files, config, DECODER_EMA)
    return {"kind": "decoder", "out": str(out), "files": sorted(files), "encoder": encoder, "notes": notes,
            "latent_shape": latent_shape, "image_size": image_size,
            "model": f"ViTDecoder {size_name or 'custom'} (width {arch['width']}, depth {arch['depth']}, "
                     f"{arch['heads']} heads, p_d {arch['patch_size']}), "
                     f"{sum(v.numel() for v in sets['ema'].values()) / 1e6:.2f}M parameters"}


#################################################################################
#                                  Statistics                                   #
#################################################################################

def import_stats(cfg: ImportConfig) -> dict:
    """stat.pt -> OUT/latent_stats.safetensors (the file a diffusion run carries, for ``rae import
    diffusion --stats OUT``) with a manifest, like every rae artifact (``rae info OUT``)."""
    mean, var, source = load_stats(cfg.source)
    out = Path(cfg.out)
    imported = {"source": source["path"], "sha256": source["content_id"]}
    latent_shape = list(mean.shape)
    config = {"statistics": STATS, "eps": NORM_EPS, "latent_shape": latent_shape, "imported_from": imported,
              "latent_space": "raw encoder space; models see (z - mean) / sqrt(var + eps)"}
    manifest = new_manifest("latent-stats", cfg, inputs={"source": source}, imported_from=imported,
                            latent_shape=latent_shape)
    _claim_run_dir(out, cfg.overwrite)
    finish_run(out, manifest, {STATS: {"mean": mean, "var": var}}, config, STATS)
    return {"kind": "stats", "out": str(out), "files": [STATS], "latent_shape": latent_shape, "notes": [],
            "model": "latent statistics (mean, var)"}


#################################################################################
#                                   Diffusion                                   #
#################################################################################

def _preset_name(cls: type, kwargs: dict) -> str | None:
    """The named size (``ditdh-xl``, ...) an inferred architecture is, if it is one."""
    for name, (preset_cls, preset) in dit_model.DIT_SIZES.items():
        if preset_cls is cls and all(kwargs.get(k) == v for k, v in preset.items()):
            return name
    return None


def import_diffusion(cfg: ImportConfig) -> dict:
    obj = read_torch_file(cfg.source)
    sets = weight_sets(obj, cfg.source)
    try:
        cls, kwargs = dit_model.config_from_reference_state_dict(sets["ema"])
    except KeyError as e:
        raise RaeError(f"{cfg.source} is not a reference LightningDiT / DiT^DH (no {e.args[0]!r})") from None
    except ValueError as e:
        raise RaeError(f"{cfg.source}: {e}") from None
    overrides = {k: getattr(cfg, k) for k in ("num_heads", "head_num_heads") if getattr(cfg, k) is not None}
    if "head_num_heads" in overrides and cls is not dit_model.DiTDH:
        raise RaeError(f"{cfg.source} is a DiT without a wide head: --head-num-heads does not apply")
    kwargs.update(overrides)
    unknown = [flag for key, flag in (("num_heads", "--num-heads"), ("head_num_heads", "--head-num-heads"))
               if key in kwargs and kwargs[key] is None]
    if unknown:
        raise RaeError(f"{cfg.source} has no RoPE tables to show its attention heads: give {' and '.join(unknown)}")
    meta = _meta_model(cls, kwargs)
    # Our RoPE tables are recomputed, not loaded: theirs must have our shapes (i.e. the same heads).
    tables = {k: tuple(v.shape) for k, v in dit_model.to_reference_state_dict(meta).items() if k.endswith("freqs_cos")}
    if any(tuple(state[k].shape) != shape for state in sets.values() for k, shape in tables.items() if k in state):
        raise RaeError(f"{cfg.source}: its RoPE tables do not fit {kwargs.get('num_heads')} / "
                       f"{kwargs.get('head_num_heads', '-')} attention heads (check --num-heads / --head-num-heads)")
    sets = {name: _float32(dit_model.from_reference_state_dict(state)) for name, state in sets.items()}
    for state in sets.values():
        _check_fits(meta, state, cfg.source, cls.__name__)

    latent_shape = [kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"]]
    mean, var, stats = load_stats(cfg.stats)
    if list(mean.shape) != latent_shape:
        raise RaeError(f"the statistics {cfg.stats} are {list(mean.shape)}, the model's latents {latent_shape}")
    encoder, image_size, notes = resolve_encoder(cfg, latent_shape, "diffusion model")
    shift = training_shift(latent_shape, cfg.shift, cfg.shift_base)
    warning = dit_model.width_rule_warning(meta.output_width, latent_shape[0])
    num_classes = kwargs["num_classes"]

    out = Path(cfg.out)
    source = _source_ref(cfg.source)
    imported = {"source": source["path"], "sha256": source["content_id"], "weights": sorted(sets),
                "step": _source_step(obj), "stats": stats["path"], "stats_sha256": stats["content_id"]}
    # The released models' training: logit-normal(0, 1) times (diffusion_config's defaults), shifted.
    config = diffusion_config(cls.__name__, kwargs, _preset_name(cls, kwargs), latent_shape, [], shift, encoder,
                              image_size=image_size, imported_from=imported)
    manifest = new_manifest("diffusion-run", cfg, inputs={"source": source, "stats": stats}, imported_from=imported,
                            encoder=encoder, latent_shape=latent_shape, num_classes=num_classes, class_names=[],
                            step=imported["step"], total_steps=imported["step"], warnings=[warning] if warning else [])
    files = {STATS: {"mean": mean, "var": var}, DIFFUSION_EMA: sets["ema"],
             **({DIFFUSION_RAW: sets["raw"]} if "raw" in sets else {})}
    _claim_run_dir(out, cfg.overwrite)
    finish_run(out, manifest, files, config, DIFFUSION_EMA)
    return {"kind": "diffusion", "out": str(out), "files": sorted(files), "encoder": encoder,
            "notes": notes + ([warning] if warning else []), "latent_shape": latent_shape, "shift": shift,
            "model": f"{cls.__name__} {config['model']['preset'] or 'custom'} ({num_classes} classes), "
                     f"{sum(v.numel() for v in sets['ema'].values()) / 1e6:.2f}M parameters"}


def _fetch(cfg: ImportConfig) -> ImportConfig:
    """Released files named ``hf://OWNER/REPO/FILE`` -> their files in the Hugging Face cache (downloaded
    there first when needed); the config then holds the local paths, and the hf:// names in ``hf_names``
    (recorded with it in the output's manifest)."""
    named = {k: hf_name(getattr(cfg, k)) for k in ("source", "stats") if is_hf(getattr(cfg, k))}
    if not named:
        return cfg
    return dataclasses.replace(cfg, hf_names=named, **{k: hf_file(v, cfg.offline) for k, v in named.items()})


@stage
def run(cfg: ImportConfig) -> dict:
    _validate(cfg)
    cfg = _fetch(cfg)
    result = {"decoder": import_decoder, "stats": import_stats, "diffusion": import_diffusion}[cfg.kind](cfg)
    return {**result, "hf": cfg.hf_names or {}}
