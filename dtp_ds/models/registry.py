"""Model-config registry: every JSON in ``configs/`` becomes an open_clip model name.

open_clip only scans directories of plain open_clip JSONs (``add_model_config``) and its
``CLIPVisionCfg`` rejects unknown keys. A dtp_ds config is an open_clip config whose
``vision_cfg`` also holds ``trunk_cfg`` (pooling, stem) and/or ``reducer_cfg``
(``{"type": "drip", ...}``: the token reducer and its options; the first wave's ``drip_cfg``
is read as both, :func:`upgrade_vision_cfg`). Registering such a config:

1. pops them and registers a timm model entrypoint ``dtp_<name>`` (lower case, ``-`` -> ``_``)
   that builds :class:`~.vit.VisionTransformer` with the widths, layers and patch size of
   ``vision_cfg`` and the reducer :func:`~.reducers.make_reducer` makes;
2. sets ``timm_model_name`` to it, ``timm_pool`` to the trunk's pooling and ``timm_proj`` to
   ``""``, so open_clip's ``TimmModel`` builds the trunk with ``num_classes=embed_dim``:
   the trunk's bias-free head *is* the CLIP projection (as CLIP's own ``proj``), the whole
   image tower is one module, and ``TimmModel.head`` stays empty;
3. hands the result to open_clip's config table, so ``open_clip.create_model``,
   ``get_tokenizer`` and the transforms treat the name like any other.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip import factory as _oc_factory
from timm.layers import to_2tuple
from timm.models import register_model

from .adapters import convert_for_open_clip
from .reducers import make_reducer, reducer_class
from .vit import POOL_TYPES, VisionTransformer

__all__ = [
    "CONFIG_DIR",
    "RENAMED_MODELS",
    "create_model",
    "get_reducer_cfg",
    "get_model_config",
    "list_models",
    "load_config",
    "register_config",
    "register_model_configs",
    "register_model_file",
    "renamed_model",
    "timm_name",
    "vision_tower",
]
# timm's register_model appends each entrypoint's name to this module's __all__.

CONFIG_DIR = Path(__file__).parent / "configs"
# model names renamed in this version (old -> new): refused with the new name, never aliased
RENAMED_MODELS = {"Plain-ViT-Tiny-8": "PatchStem-ViT-Tiny-8"}
_REGISTERED: dict[str, dict[str, Any]] = {}
_TIMM_KWARGS: dict[str, dict[str, Any]] = {}

# Keys of the legacy ``drip_cfg`` that configure the trunk rather than DRIP's reducer.
LEGACY_TRUNK_KEYS = {"pool": "pool", "stem": "stem"}
TRUNK_KEYS = {"pool", "stem", "drop_path_rate"}


def load_config(path: Path) -> dict[str, Any]:
    """Read one model JSON and check it has open_clip's three top-level keys."""
    with open(path) as f:
        cfg = json.load(f)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config {path} lacks {missing}: not an open_clip model config")
    return cfg


def timm_name(name: str) -> str:
    """timm entrypoint name for a dtp_ds trunk config name (timm names cannot hold '.')."""
    return "dtp_" + name.lower().replace("-", "_").replace(".", "_")


def upgrade_vision_cfg(vision: dict[str, Any]) -> dict[str, Any]:
    """A ``vision_cfg`` in today's form: a legacy ``drip_cfg`` (the first wave's JSONs and
    checkpoints) becomes ``trunk_cfg`` (pool, stem) + ``reducer_cfg`` ``{"type": "drip", ...}``,
    which builds the same parameters."""
    vision = copy.deepcopy(vision)
    drip = vision.pop("drip_cfg", None)
    if drip is None:
        return vision
    if "reducer_cfg" in vision:
        raise ValueError("vision_cfg has both drip_cfg and reducer_cfg: keep reducer_cfg only")
    trunk = vision.setdefault("trunk_cfg", {})
    for key in LEGACY_TRUNK_KEYS:
        if key in drip:
            trunk[key] = drip.pop(key)
    vision["reducer_cfg"] = {"type": "drip", **drip}
    return vision


def is_trunk_cfg(vision: dict[str, Any]) -> bool:
    """Whether a ``vision_cfg`` builds dtp_ds's trunk (else open_clip builds its own tower)."""
    return any(k in vision for k in ("drip_cfg", "reducer_cfg", "trunk_cfg"))


def _trunk_kwargs(name: str, vision: dict[str, Any]) -> dict[str, Any]:
    trunk = vision.get("trunk_cfg", {})
    unknown = set(trunk) - TRUNK_KEYS
    if unknown:
        raise ValueError(f"{name}: unknown trunk_cfg keys {sorted(unknown)}; known: {sorted(TRUNK_KEYS)}")
    pool = trunk.get("pool", "mean_with_cls")
    if pool not in POOL_TYPES:
        raise ValueError(f"{name}: trunk_cfg pool must be one of {POOL_TYPES}, got {pool!r}")
    width = vision.get("width", 768)
    kwargs = dict(
        img_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16),
        embed_dim=width,
        depth=vision.get("layers", 12),
        num_heads=width // vision.get("head_width", 64),
        mlp_ratio=vision.get("mlp_ratio", 4.0),
        global_pool=pool,
        stem=trunk.get("stem", "patch"),
        drop_path_rate=trunk.get("drop_path_rate", 0.0),
    )
    reducer_cfg = vision.get("reducer_cfg")
    _check_reducer_cfg(name, reducer_cfg, kwargs)
    return {"trunk": kwargs, "reducer_cfg": reducer_cfg}


def _check_reducer_cfg(name: str, cfg: dict[str, Any] | None, trunk: dict[str, Any]) -> None:
    """Build the reducer once on the meta device: a bad key or layout fails at registration,
    naming the config, not at the first ``create_model``."""
    grid = (trunk["img_size"] if isinstance(trunk["img_size"], int) else trunk["img_size"][0]) // trunk["patch_size"]
    try:
        with torch.device("meta"):
            make_reducer(cfg, trunk["embed_dim"], trunk["depth"], grid * grid)
    except TypeError as e:  # an unknown keyword
        known = sorted(p for p in inspect.signature(reducer_class(cfg["type"])).parameters
                       if p not in ("dim", "depth", "num_patches"))
        raise ValueError(f"{name}: reducer_cfg {e}; the {cfg['type']!r} reducer takes {known}") from e
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def _make_entrypoint(name: str, trunk_kwargs: dict[str, Any]) -> Callable[..., VisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{name}: there are no pretrained dtp_ds trunk weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if kwargs.pop("patch_drop_rate", 0.0):
            raise ValueError(f"{name}: patch dropout is a reducer here: reducer_cfg, not patch_drop_rate")
        t = {**trunk_kwargs["trunk"], **kwargs}
        grid = to_2tuple(t["img_size"])
        num_patches = (grid[0] // t["patch_size"]) * (grid[1] // t["patch_size"])
        reducer = make_reducer(trunk_kwargs["reducer_cfg"], t["embed_dim"], t["depth"], num_patches)
        model = VisionTransformer(**t, reducer=reducer)
        # timm utilities (resolve_data_config, ...) read these.
        model.pretrained_cfg = model.default_cfg = {
            "architecture": name,
            "input_size": (3, *model.img_size),
            "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD,
            "num_classes": model.num_classes,
        }
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"dtp_ds trunk {name}: {trunk_kwargs}"
    return entrypoint


def _register_timm(name: str, trunk_kwargs: dict[str, Any]) -> None:
    if _TIMM_KWARGS.get(name) == trunk_kwargs and timm.is_model(name):
        return
    fn = _make_entrypoint(name, trunk_kwargs)
    # timm registers by fn.__name__ and expects the module to expose it.
    setattr(sys.modules[__name__], name, fn)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overwriting")  # re-registration after a config edit
        register_model(fn)
    _TIMM_KWARGS[name] = trunk_kwargs


def to_open_clip_cfg(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The open_clip form of a config: dtp_ds trunk configs get a registered timm trunk instead
    of ``trunk_cfg`` / ``reducer_cfg``; plain open_clip configs are returned unchanged (a copy)."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("flops_target", None)  # dtp_ds's promise about the config (dtp_ds.eval.sizing), not a CLIP kwarg
    if not is_trunk_cfg(cfg["vision_cfg"]):
        return cfg
    vision = upgrade_vision_cfg(cfg["vision_cfg"])
    kwargs = _trunk_kwargs(name, vision)
    vision.pop("trunk_cfg", None)
    vision.pop("reducer_cfg", None)
    tname = timm_name(name)
    _register_timm(tname, kwargs)
    vision.update(timm_model_name=tname, timm_pool=kwargs["trunk"]["global_pool"], timm_proj="")
    cfg["vision_cfg"] = vision
    return cfg


def register_config(name: str, cfg: dict[str, Any]) -> None:
    """Make one config (plain open_clip or DRIP) available to ``open_clip.create_model(name)``."""
    _oc_factory._MODEL_CONFIGS[name] = to_open_clip_cfg(name, cfg)
    _REGISTERED[name] = copy.deepcopy(cfg)


def register_model_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Register every config in ``config_dir`` with open_clip; returns the names."""
    names = []
    for path in sorted(config_dir.glob("*.json")):
        register_config(path.stem, load_config(path))
        names.append(path.stem)
    return names


def register_model_file(path: str | Path) -> str:
    """Register one model JSON (e.g. an ablation variant) under its file name; returns the name."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such model config file {path}")
    register_config(path.stem, load_config(path))
    return path.stem


def renamed_model(name: str) -> str | None:
    """The refusal of a model name this version renamed, naming the new one; None for any other."""
    new = RENAMED_MODELS.get(name)
    return f"model '{name}' was renamed {new}: use {new}" if new else None


def _refuse_renamed(name: str) -> None:
    if why := renamed_model(name):
        raise ValueError(why)


def get_reducer_cfg(name: str) -> dict[str, Any] | None:
    """The ``reducer_cfg`` of a registered dtp_ds model (a legacy ``drip_cfg`` upgraded);
    ``None`` for models without a dtp_ds trunk."""
    _refuse_renamed(name)
    if name not in _REGISTERED:
        raise ValueError(f"unknown dtp_ds model '{name}'; dtp_ds models: {', '.join(list_models())}")
    return upgrade_vision_cfg(_REGISTERED[name]["vision_cfg"]).get("reducer_cfg")


def get_model_config(name: str) -> dict[str, Any] | None:
    """The config to store with a checkpoint: dtp_ds's own form (``drip_cfg`` kept, so
    ``register_config`` can rebuild the model anywhere), else open_clip's."""
    _refuse_renamed(name)
    if name in _REGISTERED:
        return copy.deepcopy(_REGISTERED[name])
    return open_clip.get_model_config(name)


# open_clip's own ViT towers, as dtp_ds's trunk: the vision_cfg keys the trunk honours, and its
# pool types (open_clip pools the class token by default)
OPEN_CLIP_VIT_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "pool_type"}
OPEN_CLIP_POOLS = {"tok": "cls", "avg": "mean_without_cls"}


def vision_tower(name: str, num_classes: int, **overrides: Any) -> VisionTransformer:
    """The image trunk of model config ``name`` on its own, with a ``num_classes``-wide head and
    no text tower (a classifier). A dtp_ds config builds its trunk as the CLIP does (reducer,
    pooling, stem); an open_clip ViT config (e.g. ``ViT-B-32``) builds dtp_ds's plain trunk
    with its widths, pooled as open_clip pools it (``pool_type`` ``tok``: the class token).
    ``overrides``: trunk keywords that win over the config's (``drop_path_rate``)."""
    _refuse_renamed(name)
    cfg = get_model_config(name) if name in _REGISTERED or name in open_clip.list_models() else None
    if cfg is None:
        raise ValueError(f"unknown model '{name}'; dtp_ds models: {', '.join(list_models())}")
    vision = upgrade_vision_cfg(cfg["vision_cfg"])
    if not is_trunk_cfg(vision):
        other = sorted(set(vision) - OPEN_CLIP_VIT_KEYS)
        pool = OPEN_CLIP_POOLS.get(vision.get("pool_type", "tok"))
        if other or pool is None or not isinstance(vision.get("layers", 12), int):
            raise ValueError(f"{name}: not a plain open_clip ViT dtp_ds's trunk can build (vision_cfg keys "
                             f"{other or sorted(vision)}, pool_type {vision.get('pool_type', 'tok')!r}); "
                             f"use a dtp_ds model config")
        vision = {**vision, "trunk_cfg": {"pool": pool}}
    return _make_entrypoint(timm_name(name), _trunk_kwargs(name, vision))(num_classes=num_classes, **overrides)


def list_models() -> list[str]:
    """Names dtp_ds ships (open_clip's own names are available too)."""
    return sorted(_REGISTERED)


def create_model(name: str, **kwargs: Any):
    """``open_clip.create_model`` with dtp_ds's configs registered; clear error on unknown names."""
    _refuse_renamed(name)
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model '{name}'. dtp_ds models: {', '.join(list_models())}; "
            f"open_clip models: open_clip.list_models() (e.g. ViT-B-32)"
        )
    return open_clip.create_model(name, **kwargs)


def _install_warm_start() -> None:
    """``open_clip.create_model(name, pretrained=FILE)`` for a dtp_ds name and the weights of
    another ViT layout (an open_clip or timm ViT): open_clip's ``load_checkpoint`` passes every
    state dict through ``factory.convert_state_dict`` ("third-party state dicts -> open_clip",
    no public hook), so the trunk's mapping (:mod:`.adapters`) runs there, after open_clip's own."""
    original = _oc_factory.convert_state_dict
    if getattr(original, "dtp_ds_warm_start", False):
        return

    def convert_state_dict(model, state_dict):
        return convert_for_open_clip(model, original(model, state_dict))

    convert_state_dict.dtp_ds_warm_start = True  # type: ignore[attr-defined]
    _oc_factory.convert_state_dict = convert_state_dict


def _install_renamed_refusal() -> None:
    """``open_clip.create_model`` (and ``get_tokenizer``) of a renamed dtp_ds name: the refusal
    naming the new name, not open_clip's "not found" (open_clip looks configs up through
    ``factory.get_model_config``, no public hook)."""
    original = _oc_factory.get_model_config
    if getattr(original, "dtp_ds_renamed", False):
        return

    def get_model_config(model_name):
        _refuse_renamed(model_name)
        return original(model_name)

    get_model_config.dtp_ds_renamed = True  # type: ignore[attr-defined]
    _oc_factory.get_model_config = get_model_config


# Importing the registry registers the shipped configs: ``import dtp_ds`` relies on it (directly,
# or from its hook once open_clip is imported), so the names exist whichever comes first.
register_model_configs()
_install_warm_start()
_install_renamed_refusal()
