"""DynamicViT (Rao et al. 2021, "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification"), re-implemented from the paper (its MIT code was read, not copied).

Before each of a few blocks (``stages``; default three, evenly spaced: 3/6/9 of 12 blocks) a score
predictor rates the patch tokens: LayerNorm -> Linear -> GELU; the features are split into a local
half and a global half, the global half averaged over the tokens still kept (weighted by the
policy), broadcast, concatenated with the local half, then an MLP (Linear, GELU, Linear, GELU,
Linear) to two logits, log-softmax: (keep, drop). Stage ``s`` (from 1) keeps ``rho ** s`` of the
patch tokens; CLS is always kept.

**Training** (``dynamicvit``) does *not* cut compute, as in the paper: every token runs every
block. A stage samples hard keep decisions by Gumbel-Softmax (straight-through) and multiplies
them into the previous stage's policy (carried in the forward's :class:`PolicyCarry`); the policy
is the tokens' :class:`~dtp_ds.models.protocol.TokenWeights`: it gates attention (a dropped token
receives no attention from the others, every token still attends to itself, multiplicatively:
:func:`~dtp_ds.models.vit.policy_weights`, so the predictor has a gradient at dropped tokens) and
weighs the final pooling. Auxiliary losses:

* ``ratio_loss``: ``ratio_weight`` (paper: 2) x the mean over stages of
  ``(mean policy of a sample's patch tokens - rho ** s) ** 2``, averaged over samples;
* ``distill_loss`` (only with a ``teacher``): ``distill_weight`` (paper: 0.5) x a policy-weighted
  MSE between the student's and the teacher's final tokens (before the final norm, each put
  through a parameter-free layer norm), CLS included. The paper's second 0.5 (KL to the teacher's
  class logits) has no counterpart in CLIP, which has no logits; the CLS token, which
  ``mean_with_cls`` pooling also reads, is distilled as a token instead. No teacher: no
  distillation term.

The teacher is a plain trunk (no reducer) of the student's geometry, loaded from ``teacher``: a
safetensors file (``tools/export_checkpoint``'s export of a plain run: its ``visual.trunk.*``
keys) or a ``.pt``/``.pth`` state dict of such a trunk. It is built on the first training
forward, frozen, in eval mode, held in a plain list (not a submodule: outside ``parameters()``,
``state_dict()`` and the optimizer, and out of ZeRO's reach), moved to the input's device and the
student's dtype, and runs on the same images inside the training forward, so training FLOP
counts include it. A DeepSpeed checkpoint directory is refused with the command that exports it
(the loader lives in ``dtp_ds.train``, which ``dtp_ds.models`` may not import).

**Evaluation** prunes for real: at each stage the ``floor(rho ** s * N)`` patch tokens (at least
one) with the highest predicted keep score are gathered (kept in raster order) and the rest are
gone; deterministic. :meth:`planned_tokens` gives these evaluation counts (FLOP counts);
:meth:`plan` (the memory model) plans every token in every block, as training runs them, and the
fp32 attention matrices the masked attention saves.

**``dynamicvit_drop``** really drops tokens in training: each stage keeps the same number of
tokens as evaluation, the top-k by Gumbel-perturbed keep scores (logistic noise on the keep
logit: a Gumbel-max keep/drop draw per token, made to fit the count), and scales each kept token by
a straight-through keep value (1 in the forward, the gradient of its soft keep probability), so
the predictor learns through the task loss. The count is fixed, so there is no ratio loss; the
distillation compares the kept tokens with the teacher's tokens at the same positions.

Reports ``keep_ratio`` (patch tokens kept after the last stage / patches; in ``dynamicvit``
training the mean of the final policy) and ``compression`` (its inverse), ``scores`` (the first
stage's keep probabilities) and ``extras["kept_positions"]`` (the kept patch indices, evaluation
and ``dynamicvit_drop``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..protocol import ForwardState, TokenWeights
from ..vit import ConvStem, VisionTransformer
from . import TokenPlan, TokenReducer, register_reducer


def default_stages(depth: int, count: int = 3) -> list[int]:
    """``count`` stages evenly spaced over ``depth`` blocks (12 -> 3, 6, 9; 6 -> 1, 3, 4)."""
    return [depth * s // (count + 1) for s in range(1, count + 1)]


def keep_count(patches: int, ratio: float) -> int:
    """Patch tokens a stage keeps: ``floor(ratio * patches)`` (the paper's ``int``), at least 1."""
    return max(1, min(patches, int(math.floor(ratio * patches + 1e-6))))


class ScorePredictor(nn.Module):
    """The paper's per-stage predictor: (B, N, D) tokens and (B, N) policy -> (B, N, 2) fp32
    log-probabilities (keep, drop)."""

    def __init__(self, dim: int, keep_prior: float = 0.5) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2))
        with torch.no_grad():  # start at the stage's keep ratio (relative to the previous stage)
            p = min(max(keep_prior, 1e-3), 1 - 1e-3)
            self.out_conv[-1].bias.copy_(torch.tensor([math.log(p), math.log(1 - p)]))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:].float()
        if policy is None:
            g = glob.mean(1, keepdim=True)
        else:
            w = policy.float().unsqueeze(-1)
            g = (glob * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)
        h = torch.cat([local, g.to(h.dtype).expand(-1, h.shape[1], -1)], dim=-1)
        return self.out_conv(h).float().log_softmax(dim=-1)


def _unwrap(state: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "module", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    return state


def read_teacher_state(path: str) -> dict[str, torch.Tensor]:
    """A plain trunk's weights (keys as in a bare :class:`VisionTransformer`, reducer and head
    left out) from a safetensors export of a CLIP model (``visual.trunk.*``) or of a trunk, or
    from a ``.pt``/``.pth`` state dict (read weights-only)."""
    if os.path.isdir(path):
        raise ValueError(f"DynamicViT teacher {path} is a directory: export a checkpoint first with "
                         f"`tools/export_checkpoint --checkpoint {path} --out teacher.safetensors` and name that file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DynamicViT teacher {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    for prefix in ("visual.trunk.", "model.visual.trunk.", "trunk.", ""):
        if any(k.startswith(prefix + "blocks.") for k in state):
            break
    else:
        raise ValueError(f"DynamicViT teacher {path}: no dtp_ds trunk in it (no '[visual.trunk.]blocks.*' keys; "
                         f"open_clip's own ViT is not a dtp_ds trunk: train the plain arm with the 'none' reducer)")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
            and not k[len(prefix):].startswith(("reducer.", "head."))}


@dataclass
class PolicyCarry:
    """What one forward carries from stage to stage (:attr:`ForwardState.carry`)."""

    keep: torch.Tensor | None = None  # (B, 1 + N) the masked stages' policy so far, CLS first (always 1)
    policies: list[torch.Tensor] = field(default_factory=list)  # each masked stage's patch policy (B, N)
    positions: torch.Tensor | None = None  # (B, K) the patches the pruned stages kept, raster order


@register_reducer("dynamicvit")
class DynamicViTReducer(TokenReducer):
    """DynamicViT, masked in training (see module doc)."""

    drops_in_training = False
    stat_names = ("compression", "keep_ratio")

    def __init__(self, dim: int, depth: int, num_patches: int, rho: float = 0.7, stages: list[int] | None = None,
                 ratio_weight: float = 2.0, distill_weight: float = 0.5, teacher: str | None = None,
                 tau: float = 1.0) -> None:
        super().__init__()
        stages = default_stages(depth) if stages is None else [int(s) for s in stages]
        if not stages or any(not 0 < s < depth for s in stages) or any(a >= b for a, b in zip(stages, stages[1:])):
            raise ValueError(f"DynamicViT stages={stages}: increasing block boundaries inside the trunk "
                             f"(1..{depth - 1})")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"DynamicViT rho={rho}: the keep ratio per stage must be in (0, 1]")
        self.stages, self.depth, self.rho, self.tau = stages, depth, float(rho), float(tau)
        self.ratios = [self.rho ** (s + 1) for s in range(len(stages))]
        self.ratio_weight, self.distill_weight = float(ratio_weight), float(distill_weight)
        self.teacher_path = teacher
        self.num_patches = num_patches
        self.predictors = nn.ModuleList(ScorePredictor(dim, self.rho) for _ in stages)
        self._teacher: list[VisionTransformer] = []  # a plain list: not a submodule (see module doc)
        self._geometry: dict[str, Any] = {}

    def check(self, trunk: nn.Module) -> None:
        if self.stages[-1] >= len(trunk.blocks):
            raise ValueError(f"DynamicViT stages={self.stages}: the trunk has {len(trunk.blocks)} blocks")
        blk = trunk.blocks[0]
        self._geometry = dict(img_size=trunk.img_size, patch_size=trunk.patch_size, embed_dim=trunk.embed_dim,
                              depth=len(trunk.blocks), num_heads=blk.attn.num_heads,
                              mlp_ratio=blk.mlp.fc1.out_features / trunk.embed_dim, num_classes=0,
                              global_pool=trunk.global_pool,
                              stem="conv" if isinstance(trunk.patch_embed, ConvStem) else "patch")

    # --- plans ------------------------------------------------------------------------------
    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        """Evaluation counts (the pruned forward): CLS + ``floor(rho ** s * patches)`` from stage s on."""
        out, tokens = [], patches + 1.0
        stage_at = dict(zip(self.stages, self.ratios))
        for i in range(depth):
            if i in stage_at:
                tokens = 1.0 + keep_count(patches, stage_at[i])
            out.append(tokens)
        return out

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        """Training runs every token in every block (attention masked, not shortened); from the
        first stage on the masked attention is explicit and saves fp32 (heads, T, T) matrices
        (about four per block: logits' exp, masked, normalised, and the policy broadcast; heads
        taken as width / 64) and fp32 copies of q, k, v."""
        tokens = (patches + 1.0,) * depth
        heads = max(1, width // 64)
        masked = depth - self.stages[0]
        attn = masked * (4 * heads * tokens[0] ** 2 * 4 + 3 * tokens[0] * width * 4)
        predictor = len(self.stages) * patches * (3 * width + 16) * 4
        return TokenPlan(tokens, (None,) * depth, patches + 1.0, False, attn + predictor)

    # --- teacher ----------------------------------------------------------------------------
    def teacher(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                ) -> VisionTransformer | None:
        """The frozen teacher (loaded on first use), on ``device`` in ``dtype``; None without one."""
        if self.teacher_path is None:
            return None
        if not self._teacher:
            if not self._geometry:
                raise ValueError("DynamicViT teacher: the reducer is not inside a trunk")
            model = VisionTransformer(**self._geometry)
            state = read_teacher_state(self.teacher_path)
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as e:
                raise ValueError(f"DynamicViT teacher {self.teacher_path} does not fit the student's trunk: {e}") from e
            if missing or unexpected:
                raise ValueError(f"DynamicViT teacher {self.teacher_path} does not fit the student's trunk: missing "
                                 f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
            model.requires_grad_(False).eval()
            self._teacher.append(model)
        model = self._teacher[0]
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    def _teacher_tokens(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The teacher's final tokens before its final norm (B, 1 + N, D)."""
        model = self.teacher(images.device, dtype)
        if tuple(images.shape[-2:]) != tuple(model.img_size):
            model.set_input_size(tuple(images.shape[-2:]))
        with torch.no_grad():
            t, _, _ = model._embed(images)
            for blk in model.blocks:
                t, _, _ = blk(t)
        return t

    # --- forward ----------------------------------------------------------------------------
    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        if index == self.stages[0]:
            st.carry = PolicyCarry()
        if index in self.stages:
            j = self.stages.index(index)
            if self.training and not self.drops_in_training:
                return self._mask(j, x, st)
            return self._prune(j, x, st)
        if index == self.depth:
            self._finish(x, st)
        return x

    def check_input(self, patches: int, grid: tuple[int, int] | None, strategy: str) -> None:
        if self.teacher_path is not None and self.distill_weight > 0 and patches != self.num_patches:
            raise ValueError(f"the {self.type_name} reducer cannot train under seqcomp {strategy}: its "
                             f"distillation compares token by token with a teacher on the stored {self.num_patches} "
                             f"patches, and patch scaling gives {patches}; use token dropout (r=...) only with it")

    def _mask(self, j: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        carry: PolicyCarry = st.carry
        prev = None if carry.keep is None else carry.keep[:, 1:]
        logp = self.predictors[j](x[:, 1:], prev)
        if j == 0:
            st.scores = logp[..., 0].detach().exp()
        hard = F.gumbel_softmax(logp, tau=self.tau, hard=True)[..., 0]  # 0/1, soft gradient
        policy = hard if prev is None else hard * prev
        carry.keep = torch.cat([policy.new_ones(policy.shape[0], 1), policy], dim=1)
        carry.policies.append(policy)
        st.weights = TokenWeights(attn_gate=carry.keep, pool=carry.keep)
        return x

    def _prune(self, j: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        logp = self.predictors[j](x[:, 1:], None)
        if j == 0:
            st.scores = logp[..., 0].detach().exp()
        k = min(x.shape[1] - 1, keep_count(st.patches, self.ratios[j]))
        score = logp[..., 0] - logp[..., 1]  # keep logit: ranks as log p(keep) does
        if self.training:  # dynamicvit_drop: a Gumbel-max keep/drop draw per token, fitted to the count
            u = torch.rand_like(score).clamp_(1e-6, 1 - 1e-6)
            score = score + (u.log() - (-u).log1p())
        idx = score.detach().topk(k, dim=1).indices.sort(dim=1).values  # (B, k), raster order
        dim = x.shape[-1]
        kept = x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, dim))
        if self.training:
            p = logp[..., 0].exp().gather(1, idx)
            kept = kept * (1.0 + p - p.detach()).to(x.dtype).unsqueeze(-1)  # 1 forward, d p backward
        carry: PolicyCarry = st.carry
        carry.positions = idx if carry.positions is None else carry.positions.gather(1, idx)
        st.extras["kept_positions"] = carry.positions
        return torch.cat([x[:, :1], kept], dim=1)

    def _finish(self, x: torch.Tensor, st: ForwardState) -> None:
        carry: PolicyCarry = st.carry
        if carry.keep is not None:
            ratio = carry.keep[:, 1:].detach().mean()
        else:
            ratio = torch.tensor((x.shape[1] - 1) / st.patches, device=x.device)
        st.stats["keep_ratio"] = ratio.float()
        st.stats["compression"] = 1.0 / ratio.float().clamp_min(1e-6)
        if not self.training:
            return
        if carry.policies and self.ratio_weight > 0:
            terms = [(p.mean(dim=1) - r).square().mean() for p, r in zip(carry.policies, self.ratios)]
            st.aux_losses["ratio_loss"] = self.ratio_weight * torch.stack(terms).mean()
        if self.teacher_path is not None and self.distill_weight > 0:
            if st.images is None:
                raise ValueError("DynamicViT distillation needs the input images in the forward state")
            st.aux_losses["distill_loss"] = self.distill_weight * self._distill(x, st)

    def _distill(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        t = self._teacher_tokens(st.images, x.dtype)
        carry: PolicyCarry = st.carry
        kept = st.kept_patches
        if kept is not None:  # token dropout at the input: the teacher's tokens at the kept patches
            t = torch.cat([t[:, :1], t[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, t.shape[-1]))], dim=1)
        pos = carry.positions
        if pos is not None:  # the student's kept tokens: compare with the teacher's at those positions
            t = torch.cat([t[:, :1], t[:, 1:].gather(1, pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))], dim=1)
        dim = x.shape[-1]
        err = (F.layer_norm(x.float(), (dim,)) - F.layer_norm(t.float(), (dim,))).square().mean(dim=-1)  # (B, T)
        if carry.keep is None:
            return err.mean()
        w = carry.keep.detach()  # the tokens the policy keeps (the paper selects them), CLS always
        return ((err * w).sum(dim=1) / w.sum(dim=1)).mean()


@register_reducer("dynamicvit_drop")
class DynamicViTDropReducer(DynamicViTReducer):
    """DynamicViT that drops tokens in training too (see module doc): the evaluation counts,
    top-k by Gumbel-perturbed keep scores, straight-through keep values; no ratio loss."""

    drops_in_training = True

    def __init__(self, dim: int, depth: int, num_patches: int, rho: float = 0.7, stages: list[int] | None = None,
                 distill_weight: float = 0.5, teacher: str | None = None) -> None:
        super().__init__(dim, depth, num_patches, rho=rho, stages=stages, ratio_weight=0.0,
                         distill_weight=distill_weight, teacher=teacher)

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        tokens = tuple(self.planned_tokens(patches, depth, rate))
        predictor = len(self.stages) * patches * (3 * width + 16) * 4
        return TokenPlan(tokens, (None,) * depth, tokens[-1], False, predictor)
