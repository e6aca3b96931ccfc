"""Token reducers: what shortens the trunk's token sequence (see ``models/README.md``).

A reducer is an ``nn.Module`` with four hooks the trunk (:class:`~dtp_ds.models.vit.VisionTransformer`)
calls in every forward; each defaults to doing nothing, so a reducer overrides only where it acts:

- ``on_input(x, st)``: the tokens (B, 1 + N, D) after positions (patch dropout); a training-time
  input compression (token dropout, patch scaling) has already acted (``check_input`` refuses
  one the reducer cannot run on);
- ``at_boundary(i, x, st)``: before block ``i`` (``i = depth``: after the last block) (DRIP,
  TokenLearner, grouping); may switch to packed rows by setting ``st.packing``;
- ``mid_block(i, st)``: a function run between block ``i``'s attention and MLP, or ``None`` (ToMe:
  it gets the attention keys and carries token sizes, which attention and pooling then weigh);
- ``pin(tokens)``: fix the number of tokens the reduction keeps (FLOP counts, memory checks at a
  given compression), ``None`` to unpin;
- ``schedule(total_steps)``: a schedule the Trainer steps and checkpoints (patch dropout's unmasked
  final segment), or ``None``.

Everything a forward produces besides the tokens (auxiliary losses, detached statistics, the group
each patch ended in) goes into the :class:`~dtp_ds.models.vit.ForwardState` ``st``, never onto the
module. ``planned_tokens`` says, without a forward, how many tokens per sample enter each block
(FLOP counts pin to its fewest); ``plan`` adds what the memory model and the tuner need besides
(:class:`TokenPlan`: the padded attention length where tokens are packed rows of unequal length,
the tokens the final norm sees, the bytes the reducer's own layers save for backward).

A new reducer is one file: a subclass registered with :func:`register_reducer` and imported below,
or, without touching dtp_ds, named in the model JSON as ``"type": "package.module:Class"``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..vit import ForwardState, MidBlockFn

REDUCERS: dict[str, type[TokenReducer]] = {}


def register_reducer(name: str):
    """Class decorator: ``"reducer_cfg": {"type": name, ...}`` in a model JSON builds this class
    with the trunk's ``dim``, ``depth``, ``num_patches`` and the config's other keys."""

    def wrap(cls: type[TokenReducer]) -> type[TokenReducer]:
        REDUCERS[name] = cls
        cls.type_name = name
        return cls

    return wrap


@dataclass(frozen=True)
class TokenPlan:
    """A reducer's expected token layout per sample, without a forward (memory model, tuner)."""

    tokens: tuple[float, ...]  # mean tokens (CLS included) entering each block
    # per block: attention's padded length when the tokens are packed rows of unequal length
    # (the batch's longest sequence), None when every sample has the same length (dense)
    padded: tuple[float | None, ...]
    final: float  # tokens into the final norm and pooling
    final_packed: bool  # pooled from packed rows (the trunk's pooling keeps an fp32 copy)
    reducer_bytes: float = 0.0  # bytes per sample the reducer's own layers save for backward

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.padded):
            raise ValueError(f"a plan of {len(self.tokens)} blocks has {len(self.padded)} padded lengths")


class TokenReducer(nn.Module):
    """The protocol, with do-nothing defaults (see the module doc)."""

    type_name = "none"

    def check(self, trunk: nn.Module) -> None:
        """Raise ``ValueError`` if this reducer cannot run in ``trunk`` (depth, grid, ...)."""

    def check_input(self, patches: int, grid: tuple[int, int] | None, strategy: str) -> None:
        """Raise ``ValueError`` (naming this reducer) if it cannot train on ``patches`` patch tokens
        arranged as ``grid`` (``None``: a random subset in raster order, no grid) under the input
        compression ``strategy`` (:mod:`dtp_ds.models.compression`). The default: any input."""

    def on_input(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        return x

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        return x

    def mid_block(self, index: int, st: ForwardState) -> MidBlockFn | None:
        return None

    def pin(self, tokens: int | None) -> None:
        """Keep exactly ``tokens`` patch tokens (groups) per sample; ``None``: as learned. A reducer
        whose count does not depend on the content has nothing to pin (the default)."""

    def schedule(self, total_steps: int) -> Any:
        """A :class:`~dtp_ds.train.schedule.Schedule` this reducer needs over a run of
        ``total_steps`` (FLIP's unmasked final segment), or ``None``."""
        return None

    def upgrade_state_dict(self, state_dict: dict[str, Any], trunk_prefix: str) -> None:
        """Rename, in place, keys an older layout of this reducer's trunk saved (checkpoints
        of earlier versions keep loading)."""

    def default_rate(self) -> float | None:
        """The reducer's rate as configured (DRIP: its boundary rate); ``None``: it has none."""
        return None

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        """Expected tokens per sample (CLS included) entering each block at ``rate`` (default:
        :meth:`default_rate`), and their largest value in a batch (padding) where it differs."""
        return [float(patches + 1)] * depth

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        """:meth:`planned_tokens` and the rest of the layout (:class:`TokenPlan`) at ``rate``;
        ``padding_sigmas``: how far over the mean the batch's longest sequence lies (0: every
        sample alike, as when pinned). The default: dense blocks, nothing saved of its own."""
        tokens = tuple(self.planned_tokens(patches, depth, rate))
        return TokenPlan(tokens, (None,) * len(tokens), tokens[-1] if tokens else patches + 1.0, False)


@register_reducer("none")
class NoReducer(TokenReducer):
    """No reduction: the trunk is a plain ViT."""


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


from . import drip, dropout, dynamicvit, grouping, tokenlearner, tome  # noqa: E402,F401  (each registers itself)

__all__ = ["REDUCERS", "NoReducer", "TokenPlan", "TokenReducer", "make_reducer", "pinned_tokens", "reducers_of",
           "register_reducer"]
