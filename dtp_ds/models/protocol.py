"""The token-reducer protocol, in one place: the types a reducer and the trunk share.

A reducer (:class:`TokenReducer`) is an ``nn.Module`` the trunk (:class:`~dtp_ds.models.vit.VisionTransformer`)
calls in every forward. It has 11 methods (1 required, 10 hooks) and 2 declarations:

Required (1)
  ``planned_tokens(patches, depth, rate)``: tokens per sample (CLS included) entering each
  block, without a forward. FLOP counts, the memory model and the tuner read it: a subclass that
  does not define it is refused when it is defined (no silent "no reduction").

Hooks (10; each does nothing unless overridden)
  ``on_input(x, st)``: the tokens (B, 1 + N, D) after positions (a training-time seqcomp
  has already acted; ``check_input`` refuses one the reducer cannot train on);
  ``at_boundary(i, x, st)``: before block ``i`` (``i = depth``: after the last block); may switch
  to packed rows by setting ``st.packing`` (DRIP, TokenLearner, grouping) or weigh the dense
  tokens by setting ``st.weights`` (DynamicViT's policy);
  ``mid_block(i, st)``: a :data:`MidBlockFn` run between block ``i``'s attention and MLP, or
  ``None`` (ToMe: it gets the attention keys and returns merged tokens and their weights);
  ``pin(tokens)``: fix the kept token count (FLOP counts, memory checks at a compression);
  ``schedule(total_steps)``: an object the Trainer steps and checkpoints, or ``None``;
  ``check(trunk)``, ``check_input(patches, grid, strategy)``: refuse what cannot run, naming the reducer;
  ``plan(...)``: :meth:`planned_tokens` plus what the memory model needs (:class:`TokenPlan`);
  ``default_rate()``; ``upgrade_state_dict(state_dict, prefix)``.

Declarations (2; class attributes)
  ``stat_names``: the statistics its forwards report, every one of them (``compression``
  included, for a reducer that reports it); ``type_name``: set by ``register_reducer``.

Per forward: :class:`ForwardState` (11 fields)
  What the trunk gives (3): ``embed`` (the patch embeddings; ``st.batch`` and ``st.patches``
  follow from it), ``images``, ``kept_patches``. What the reducer sets for the trunk (2):
  ``packing`` (packed rows), ``weights`` (:class:`TokenWeights`: a per-key attention bias, a
  per-key attention gate, pooling weights; generic, for dense tokens, the bias for packed rows
  too). The reducer's own (1):
  ``carry`` (any object of its own, e.g. a dataclass, carried between its hooks; the trunk never
  reads it). What it reports (5): ``aux_losses`` (with gradient; a task adds them weighted by
  ``--reducer-loss-weight``), ``stats`` (detached scalars, exactly the names in ``stat_names``),
  ``groups`` / ``scores`` (per patch), ``extras`` (by the reducer's own names: tests, pictures).
  Never on the module, so two forwards in one step (GradCache, a teacher) each have their own
  and no graph outlives its step. The trunk returns the reports as a :class:`TowerOutput`
  (``forward_with_aux``) or hands it to an open ``record_forward()``.

Statistics under declared names
  A forward that reports a statistic its class does not declare in ``stat_names``, or a training
  forward that leaves a declared one out, is a ``ValueError`` naming the reducer, the name and the
  fix, at its first forward (:func:`check_stats`). ``compression``, by convention, is patch tokens
  per kept token (the reducers that reduce report it); callers read statistics only under
  declared names (:func:`dtp_ds.models.reducers.declared_stats`).

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


@dataclass(frozen=True)
class TokenWeights:
    """How much each token of a dense sequence (B, T) counts, for a reducer that weighs tokens
    rather than (or besides) dropping them; every block's attention and the final pooling read
    it (:attr:`ForwardState.weights`). A field left ``None`` changes nothing. The gate and the
    pooling weights are for dense tokens only (the trunk refuses them on packed rows); the bias
    is for packed rows too."""

    # (B, T) added to every query's attention logit for key j; on packed rows (N,), one per row,
    # padded as attention pads the rows (padding stays masked). Proportional attention (ToMe's
    # merged tokens, DRIP's pooled segments): the log of the patches a token stands for
    attn_bias: torch.Tensor | None = None
    # (B, T) in [0, 1]: multiplies key j's attention weight for every query but j itself, then
    # renormalises (:func:`~dtp_ds.models.vit.policy_weights`: at 0 the key is hidden and the gate
    # still has a gradient); attention then runs explicitly in fp32 (DynamicViT's token policy)
    attn_gate: torch.Tensor | None = None
    # (B, T) each token's weight in mean pooling (ToMe: its size; DynamicViT: its policy); a
    # token at 0 is not valid in ``forward_tokens_valid``
    pool: torch.Tensor | None = None


# A reducer's hook between a block's attention and its MLP: (tokens, packing, token weights or
# None, attention keys averaged over heads) -> (tokens, packing, token weights). It may run twice
# per forward under activation checkpointing, so it must be a pure function of its inputs (and the
# RNG state, which checkpointing replays); what changes from block to block travels in its arguments.
MidBlockFn = Callable[[torch.Tensor, "Packing | None", "TokenWeights | None", torch.Tensor],
                      "tuple[torch.Tensor, Packing | None, TokenWeights | None]"]


@dataclass
class ForwardState:
    """One forward's scratch space, handed to the reducer's hooks (see the module doc); never
    kept on a module, so two forwards in one step (GradCache, a teacher) each have their own and
    no graph outlives its step."""

    # what the trunk gives
    embed: torch.Tensor  # (B, N, D) the patch embeddings entering the trunk, before positions (content only)
    images: torch.Tensor | None = None  # the forward's input images (a teacher runs on them)
    kept_patches: torch.Tensor | None = None  # (B, N) patch indices kept by seqcomp's token dropout, or None
    # what the reducer sets for the trunk
    packing: Packing | None = None  # set while the tokens are packed rows
    weights: TokenWeights | None = None  # per-token attention and pooling weights of dense tokens
    # the reducer's own, between its hooks (any object; the trunk never reads it)
    carry: Any = None
    # what the reducer reports
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # with grad, weight 1 each
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, under stat_names
    groups: torch.Tensor | None = None  # (B, N) long: the group each patch ended in
    scores: torch.Tensor | None = None  # (B, N) the reducer's per-patch score (e.g. boundary probability)
    extras: dict[str, Any] = field(default_factory=dict)  # by the reducer's own names (tests, pictures)

    @property
    def batch(self) -> int:
        return self.embed.shape[0]

    @property
    def patches(self) -> int:
        """The patch tokens entering the trunk (fewer under seqcomp's token dropout in training)."""
        return self.embed.shape[1]

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
    unless overridden, ``stat_names`` every statistic its forwards report."""

    type_name = "none"
    # every detached statistic its forwards report in ForwardState.stats ("compression" included)
    stat_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "planned_tokens" not in {n for c in cls.__mro__[:-1] if c is not TokenReducer for n in vars(c)}:
            raise TypeError(f"{cls.__name__}: a TokenReducer must define planned_tokens(patches, depth, rate) "
                            f"(FLOP counts and the memory model read it; a reducer that reduces nothing returns "
                            f"[patches + 1.0] * depth)")
        if not (isinstance(cls.stat_names, tuple) and all(isinstance(n, str) for n in cls.stat_names)):
            raise TypeError(f"{cls.__name__}.stat_names must be a tuple of names, e.g. ('compression',), got "
                            f"{cls.stat_names!r}")

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


def check_stats(reducer: TokenReducer, stats: dict[str, Any], training: bool) -> None:
    """``ValueError`` naming ``reducer``, the statistic and the fix when a forward reported one its
    class does not declare in ``stat_names``, or (``training``) left a declared one out. The trunk
    calls it after every forward: a reducer that breaks the rule fails at its first forward."""
    cls = type(reducer)
    declared = cls.stat_names
    undeclared = [k for k in stats if k not in declared]
    if undeclared:
        raise ValueError(f"the {reducer.type_name} reducer ({cls.__qualname__}) reported statistic(s) "
                         f"{undeclared} that it does not declare: add them to {cls.__qualname__}.stat_names "
                         f"(declared: {declared})")
    missing = [k for k in declared if k not in stats] if training else []
    if missing:
        raise ValueError(f"the {reducer.type_name} reducer ({cls.__qualname__}) declares statistic(s) {missing} "
                         f"in stat_names but its training forward did not report them: report each in every "
                         f"training forward (st.stats[name] = ...), or remove it from {cls.__qualname__}.stat_names")
