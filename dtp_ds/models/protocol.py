"""The token-reducer protocol, in one place: the types a reducer and the trunk share.

A reducer (:class:`TokenReducer`) is an ``nn.Module`` the trunk (:class:`~dtp_ds.models.vit.VisionTransformer`)
calls in every forward. What it must say, and what it may do:

Required
  ``planned_tokens(patches, depth, rate)``: tokens per sample (CLS included) entering each
  block, without a forward. FLOP counts, the memory model and the tuner read it: a subclass that
  does not define it is refused when it is defined (no silent "no reduction").

Hooks (each does nothing unless overridden)
  ``on_input(x, st)``: the tokens (B, 1 + N, D) after positions (a training-time seqcomp
  has already acted; ``check_input`` refuses one the reducer cannot train on);
  ``at_boundary(i, x, st)``: before block ``i`` (``i = depth``: after the last block); may switch
  to packed rows by setting ``st.packing`` (DRIP, TokenLearner, grouping);
  ``mid_block(i, st)``: a :data:`MidBlockFn` run between block ``i``'s attention and MLP, or
  ``None`` (ToMe: it gets the attention keys and carries token sizes);
  ``pin(tokens)``: fix the kept token count (FLOP counts, memory checks at a compression);
  ``schedule(total_steps)``: an object the Trainer steps and checkpoints, or ``None``;
  ``check(trunk)``, ``check_input(...)``: refuse what cannot run, naming the reducer;
  ``plan(...)``: :meth:`planned_tokens` plus what the memory model needs (:class:`TokenPlan`);
  ``default_rate()``, ``upgrade_state_dict(...)``.

Reports
  Everything a forward produces besides the tokens goes into its :class:`ForwardState`, never
  onto the module: ``aux_losses`` (with gradient; a task adds them weighted by
  ``--boundary-loss-weight``), ``stats`` (detached scalars, under the names the reducer declares
  in ``stat_names``; ``compression`` is the patches per kept token, the one statistic every
  caller reads), ``groups`` / ``scores`` (per patch). The trunk returns them as a
  :class:`TowerOutput` (``forward_with_aux``) or hands it to an open ``record_forward()``.

A new reducer is one file: a subclass registered with
:func:`dtp_ds.models.reducers.register_reducer`, or named in a model JSON as
``"type": "package.module:Class"``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .segments import Packing

# A reducer's hook between a block's attention and its MLP: (tokens, packing, token sizes or
# None, attention keys averaged over heads) -> (tokens, packing, sizes). It may run twice per
# forward under activation checkpointing, so it must be a pure function of its inputs (and the RNG
# state, which checkpointing replays); what changes from block to block travels in its arguments.
MidBlockFn = Callable[[torch.Tensor, "Packing | None", "torch.Tensor | None", torch.Tensor],
                      "tuple[torch.Tensor, Packing | None, torch.Tensor | None]"]



@dataclass
class ForwardState:
    """One forward's scratch space, handed to the reducer's hooks; never kept on a module, so
    two forwards in one step (GradCache, a teacher) each have their own and no graph outlives
    its step."""

    batch: int
    patches: int  # the patch tokens entering the trunk (fewer under seqcomp's token dropout in training)
    embed: torch.Tensor  # (B, N, D) those patches' embeddings before positions (content only)
    packing: Packing | None = None  # set while the tokens are packed rows
    sizes: torch.Tensor | None = None  # (B, T) patches per token once tokens were merged (ToMe)
    # (B, T) token policy in [0, 1] (DynamicViT training): attention ignores dropped keys, pooling weighs by it
    keep: torch.Tensor | None = None
    images: torch.Tensor | None = None  # the forward's input images (a teacher runs on them)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # with grad, weight 1 each
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars
    groups: torch.Tensor | None = None  # (B, N) long: the group each patch ended in
    scores: torch.Tensor | None = None  # (B, N) the reducer's per-patch score (e.g. boundary probability)
    extras: dict[str, Any] = field(default_factory=dict)  # reducer-specific (tests, pictures)
    memo: dict[str, Any] = field(default_factory=dict)  # the reducer's own carry between hooks

    def tokens_per_sample(self, x: torch.Tensor) -> torch.Tensor | float:
        """Mean tokens per sample of ``x`` (CLS included), without a host synchronisation."""
        if self.packing is None:
            return float(x.shape[1])
        return self.packing.lengths.float().mean()


@dataclass
class TowerOutput:
    """What an image trunk's forward gives besides its embeddings (:func:`record_forward`)."""

    features: torch.Tensor
    aux_losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    token_counts: torch.Tensor  # (depth,) mean tokens per sample entering each block, detached
    groups: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)



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
    """The protocol (see the module doc): ``planned_tokens`` required, the hooks do nothing
    unless overridden."""

    type_name = "none"
    # the detached statistics its forwards report in ForwardState.stats (besides "compression")
    stat_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "planned_tokens" not in {n for c in cls.__mro__[:-1] if c is not TokenReducer for n in vars(c)}:
            raise TypeError(f"{cls.__name__}: a TokenReducer must define planned_tokens(patches, depth, rate) "
                            f"(FLOP counts and the memory model read it; a reducer that reduces nothing returns "
                            f"[patches + 1.0] * depth)")

    def check(self, trunk: nn.Module) -> None:
        """Raise ``ValueError`` if this reducer cannot run in ``trunk`` (depth, grid, ...)."""

    def check_input(self, patches: int, grid: tuple[int, int] | None, strategy: str) -> None:
        """Raise ``ValueError`` (naming this reducer) if it cannot train on ``patches`` patch tokens
        arranged as ``grid`` (``None``: a random subset in raster order, no grid) under the seqcomp
        ``strategy`` (:mod:`dtp_ds.models.seqcomp`). The default: any input."""

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
        :meth:`default_rate`). Required of every reducer."""
        raise NotImplementedError

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        """:meth:`planned_tokens` and the rest of the layout (:class:`TokenPlan`) at ``rate``;
        ``padding_sigmas``: how far over the mean the batch's longest sequence lies (0: every
        sample alike, as when pinned). The default: dense blocks, nothing saved of its own."""
        tokens = tuple(self.planned_tokens(patches, depth, rate))
        return TokenPlan(tokens, (None,) * len(tokens), tokens[-1] if tokens else patches + 1.0, False)


