"""Model-config registry: every JSON in ``configs/`` becomes an open_clip model name.

open_clip only scans directories of plain open_clip JSONs (``add_model_config``) and its
``CLIPVisionCfg`` rejects unknown keys. A DRIP config is an open_clip config whose
``vision_cfg`` also holds a ``drip_cfg`` object (the layout). Registering such a config:

1. pops ``drip_cfg`` and registers a timm model entrypoint ``dtp_<name>`` (lower case,
   ``-`` -> ``_``) that builds :class:`DripVisionTransformer` with the widths, layers and
   patch size of ``vision_cfg`` plus ``drip_cfg``;
2. sets ``timm_model_name`` to it, ``timm_pool`` to the DRIP pooling and ``timm_proj`` to
   ``""``, so open_clip's ``TimmModel`` builds the trunk with ``num_classes=embed_dim``:
   the trunk's bias-free head *is* the CLIP projection (as CLIP's own ``proj``), the whole
   image tower is one module, and ``TimmModel.head`` stays empty;
3. hands the result to open_clip's config table, so ``open_clip.create_model``,
   ``get_tokenizer`` and the transforms treat the name like any other.
"""
from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import timm
from open_clip import factory as _oc_factory
from timm.models import register_model

from .drip import POOL_TYPES, DripVisionTransformer

__all__ = [
    "CONFIG_DIR",
    "create_model",
    "get_drip_cfg",
    "get_model_config",
    "list_models",
    "load_config",
    "register_config",
    "register_model_configs",
    "register_model_file",
    "timm_name",
]
# timm's register_model appends each entrypoint's name to this module's __all__.

CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTERED: dict[str, dict[str, Any]] = {}
_TIMM_KWARGS: dict[str, dict[str, Any]] = {}

DRIP_KEYS = {"pre", "shorten", "post", "upsample", "compression", "predictor_hidden", "temperature", "pool", "stem",
             "predictor", "eval_rule", "straight_through", "predictor_input",
             "selection", "tied"}
# drip_cfg keys a model JSON may leave out, and their values
DRIP_DEFAULTS = {"post": 0, "upsample": False, "predictor_hidden": None, "temperature": 0.5, "pool": "mean_with_cls",
                 "stem": "patch", "predictor": "mlp", "eval_rule": "expected", "straight_through": "cumsum",
                 "predictor_input": "tokens", "selection": "threshold", "tied": False}


def load_config(path: Path) -> dict[str, Any]:
    """Read one model JSON and check it has open_clip's three top-level keys."""
    with open(path) as f:
        cfg = json.load(f)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config {path} lacks {missing}: not an open_clip model config")
    return cfg


def timm_name(name: str) -> str:
    """timm entrypoint name for a DRIP config name (timm names cannot hold '.')."""
    return "dtp_" + name.lower().replace("-", "_").replace(".", "_")


def _trunk_kwargs(name: str, vision: dict[str, Any], drip: dict[str, Any]) -> dict[str, Any]:
    unknown = set(drip) - DRIP_KEYS
    if unknown:
        raise ValueError(f"{name}: unknown drip_cfg keys {sorted(unknown)}; known: {sorted(DRIP_KEYS)}")
    d = {**DRIP_DEFAULTS, **drip}
    for key in ("pre", "shorten", "compression"):
        if key not in d:
            raise ValueError(f"{name}: drip_cfg needs '{key}'")
    layers = vision.get("layers", 12)
    if d["pre"] + d["shorten"] + d["post"] != layers:
        raise ValueError(
            f"{name}: drip_cfg pre + shorten + post = {d['pre'] + d['shorten'] + d['post']} "
            f"!= vision_cfg layers = {layers}"
        )
    if d["pool"] not in POOL_TYPES:
        raise ValueError(f"{name}: drip_cfg pool must be one of {POOL_TYPES}, got {d['pool']!r}")
    width = vision.get("width", 768)
    return dict(
        img_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16),
        embed_dim=width,
        num_heads=width // vision.get("head_width", 64),
        mlp_ratio=vision.get("mlp_ratio", 4.0),
        pre=d["pre"],
        shorten=d["shorten"],
        post=d["post"],
        upsample=d["upsample"],
        compression=d["compression"],
        predictor_hidden=d["predictor_hidden"],
        temperature=d["temperature"],
        global_pool=d["pool"],
        stem=d["stem"],
        predictor=d["predictor"],
        eval_rule=d["eval_rule"],
        straight_through=d["straight_through"],
        predictor_input=d["predictor_input"],
        selection=d["selection"],
        tied=d["tied"],
    )


def _make_entrypoint(name: str, trunk_kwargs: dict[str, Any]) -> Callable[..., DripVisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DripVisionTransformer:
        if pretrained:
            raise ValueError(f"{name}: there are no pretrained DRIP trunk weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if kwargs.pop("patch_drop_rate", 0.0):
            raise ValueError(f"{name}: patch dropout is not supported by DRIP trunks")
        model = DripVisionTransformer(**{**trunk_kwargs, **kwargs})
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
    entrypoint.__doc__ = f"DRIP trunk {name}: {trunk_kwargs}"
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
    """The open_clip form of a config: DRIP configs get a registered timm trunk instead of
    ``drip_cfg``; plain open_clip configs are returned unchanged (a copy)."""
    cfg = copy.deepcopy(cfg)
    vision = cfg["vision_cfg"]
    drip = vision.pop("drip_cfg", None)
    if drip is None:
        return cfg
    kwargs = _trunk_kwargs(name, vision, drip)
    tname = timm_name(name)
    _register_timm(tname, kwargs)
    vision.update(timm_model_name=tname, timm_pool=kwargs["global_pool"], timm_proj="")
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


def get_drip_cfg(name: str) -> dict[str, Any] | None:
    """The ``drip_cfg`` of a registered dtp_ds model (``None`` for plain ViTs)."""
    if name not in _REGISTERED:
        raise ValueError(f"unknown dtp_ds model '{name}'; dtp_ds models: {', '.join(list_models())}")
    return copy.deepcopy(_REGISTERED[name]["vision_cfg"].get("drip_cfg"))


def get_model_config(name: str) -> dict[str, Any] | None:
    """The config to store with a checkpoint: dtp_ds's own form (``drip_cfg`` kept, so
    ``register_config`` can rebuild the model anywhere), else open_clip's."""
    if name in _REGISTERED:
        return copy.deepcopy(_REGISTERED[name])
    return open_clip.get_model_config(name)


def list_models() -> list[str]:
    """Names dtp_ds ships (open_clip's own names are available too)."""
    return sorted(_REGISTERED)


def create_model(name: str, **kwargs: Any):
    """``open_clip.create_model`` with dtp_ds's configs registered; clear error on unknown names."""
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model '{name}'. dtp_ds models: {', '.join(list_models())}; "
            f"open_clip models: open_clip.list_models() (e.g. ViT-B-32)"
        )
    return open_clip.create_model(name, **kwargs)


# Importing the registry registers the shipped configs: ``import dtp_ds`` relies on it (directly,
# or from its hook once open_clip is imported), so the names exist whichever comes first.
register_model_configs()
