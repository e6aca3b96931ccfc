"""Token reducers: the registry and the reducers (each one file, registered here). The protocol
they implement is described once, in :mod:`dtp_ds.models.protocol`.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..protocol import TokenPlan, TokenReducer

REDUCERS: dict[str, type[TokenReducer]] = {}


def register_reducer(name: str):
    """Class decorator: ``"reducer_cfg": {"type": name, ...}`` in a model JSON builds this class
    with the trunk's ``dim``, ``depth``, ``num_patches`` and the config's other keys."""

    def wrap(cls: type[TokenReducer]) -> type[TokenReducer]:
        REDUCERS[name] = cls
        cls.type_name = name
        return cls

    return wrap


@register_reducer("none")
class NoReducer(TokenReducer):
    """No reduction: the trunk is a plain ViT."""

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        return [float(patches + 1)] * depth


def reducer_class(kind: Any) -> type[TokenReducer]:
    """A registered name, or ``"package.module:Class"`` (a reducer of one's own, in its own file:
    importing it is all it takes)."""
    if isinstance(kind, str) and ":" in kind and kind not in REDUCERS:
        module, _, name = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reducer_cfg type {kind!r}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, TokenReducer)):
            raise ValueError(f"reducer_cfg type {kind!r} is not a TokenReducer subclass")
        return cls
    if kind not in REDUCERS:
        raise ValueError(f"reducer_cfg type must be one of {sorted(REDUCERS)} or 'package.module:Class', got {kind!r}")
    return REDUCERS[kind]


def make_reducer(cfg: dict[str, Any] | None, dim: int, depth: int, num_patches: int) -> TokenReducer:
    """The reducer a model JSON's ``reducer_cfg`` names (``None``: no reduction)."""
    cfg = dict(cfg or {"type": "none"})
    cls = reducer_class(cfg.pop("type", None))
    if cls is NoReducer:
        if cfg:
            raise ValueError(f"reducer_cfg type 'none' takes no options, got {sorted(cfg)}")
        return NoReducer()
    return cls(dim=dim, depth=depth, num_patches=num_patches, **cfg)


class pinned_tokens:
    """Context manager pinning every reducer inside ``model`` to ``tokens`` kept tokens per
    sample (:meth:`TokenReducer.pin`): FLOP counts and memory checks at a given compression."""

    def __init__(self, model: nn.Module, tokens: int) -> None:
        self.reducers = [m for m in model.modules() if isinstance(m, TokenReducer)]
        self.tokens = tokens

    def __enter__(self) -> pinned_tokens:
        for r in self.reducers:
            r.pin(self.tokens)
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.reducers:
            r.pin(None)


def reducers_of(model: nn.Module) -> list[TokenReducer]:
    """Every reducer inside ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, TokenReducer)]


def declared_stats(model: nn.Module) -> tuple[str, ...]:
    """The statistics the reducers inside ``model`` declare (their ``stat_names``), each once, in
    module order: the only names their forwards report (``TowerOutput.stats``), and the names a
    caller reads them under."""
    return tuple(dict.fromkeys(n for r in reducers_of(model) for n in type(r).stat_names))


from . import drip, dropout, dynamicvit, grouping, tokenlearner, tome  # noqa: E402,F401  (each registers itself)

__all__ = ["REDUCERS", "NoReducer", "TokenPlan", "TokenReducer", "declared_stats", "make_reducer", "pinned_tokens",
           "reducers_of", "register_reducer"]
