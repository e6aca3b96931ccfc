"""Warm start: another ViT's weights mapped into dtp_ds's trunk (``--init-from``, and
``open_clip.create_model(name, pretrained=FILE)`` for dtp_ds names).

A source state dict holds one or more *vision towers*, each in one of the :data:`LAYOUTS`,
found by a marker key at any prefix (``visual.`` in an open_clip CLIP, ``visual.trunk.`` in a
dtp_ds one, none in a bare timm ViT). Each layout is a table of :class:`Rule` s: a source key
(relative to its tower) -> a trunk key and a conversion. The trunk's blocks are indexed over its
whole depth (DRIP's pre / shorten / post blocks are ranges of it), so resblock ``N`` becomes
``blocks.N`` whatever the reducer. What no rule fills (the boundary predictor, a reducer's
weights, blocks the source lacks) keeps its initialisation; every other key of the model (CLIP's
text tower, the logit scale) loads as is by name. :func:`map_state_dict` returns the mapped
state dict and one :class:`Row` per weight saying what happened to it (:data:`STATUSES`).

A trunk warm-started from a ViT computes that ViT exactly where the trunk can: with a
boundary at every patch, a DRIP trunk without upsampling is the ViT (the segment means of
one patch are the patches); with upsampling the residual is added to the pooled path and it
is not. Not representable, and said in the table: a source without ``norm_pre`` (timm ViTs
without ``pre_norm``; the trunk always normalises its input) and a classifier bias (the
trunk's head is bias-free). Not in a state dict, so not checked: the activation (OpenAI's
weights need QuickGELU; the trunk has GELU) and LayerNorm's eps (timm's ViTs but its CLIP ones
use 1e-6, the trunk torch's 1e-5: close, not exact).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .vit import VisionTransformer

log = logging.getLogger(__name__)

LOADED, MAPPED, RESIZED, FRESH, UNUSED = "loaded", "mapped", "resized", "fresh", "unused"
STATUSES = {
    LOADED: "taken as is (same name and shape)",
    MAPPED: "taken from another layout's weight (renamed, reshaped or transposed)",
    RESIZED: "positions resampled from the source's patch grid to this one (bicubic)",
    FRESH: "no source weight fits: keeps its initialisation",
    UNUSED: "a source weight nothing here takes",
}


class Misfit(ValueError):
    """A source weight that cannot become the target weight (the message says why)."""


@dataclass(frozen=True)
class Row:
    target: str  # the model's key ("" for an unused source weight)
    source: str  # the source's key ("" for a fresh weight)
    status: str  # one of STATUSES
    note: str = ""


@dataclass
class Tower:
    """One vision tower found in a source state dict."""

    layout: Layout
    prefix: str
    keys: dict[str, torch.Tensor]  # relative to ``prefix``

    def patch_grid(self, positions: int) -> tuple[int, int]:
        side = math.isqrt(positions)
        if side * side != positions:
            raise Misfit(f"{positions} patch positions are not a square grid")
        return side, side


# (source weight, the model's weight, its tower, the trunk) -> (weight, status or None, note);
# None: loaded if the name is the same, else mapped
Convert = Callable[[torch.Tensor, torch.Tensor, "Tower", VisionTransformer], "tuple[torch.Tensor, str | None, str]"]


def _same_shape(value: torch.Tensor, target: torch.Tensor) -> None:
    if value.shape != target.shape:
        raise Misfit(f"source {tuple(value.shape)}, here {tuple(target.shape)}")


def copy(value: torch.Tensor, target: torch.Tensor, tower: Tower, trunk: VisionTransformer
         ) -> tuple[torch.Tensor, str | None, str]:
    _same_shape(value, target)
    return value, None, ""


def reshape(value: torch.Tensor, target: torch.Tensor, tower: Tower, trunk: VisionTransformer
            ) -> tuple[torch.Tensor, str | None, str]:
    """open_clip's (D,) class embedding -> (1, 1, D)."""
    if value.numel() != target.numel():
        raise Misfit(f"source {tuple(value.shape)}, here {tuple(target.shape)}")
    return value.reshape(target.shape), MAPPED, ""


def transpose(value: torch.Tensor, target: torch.Tensor, tower: Tower, trunk: VisionTransformer
              ) -> tuple[torch.Tensor, str | None, str]:
    """open_clip's ``x @ proj`` (D, E) -> a Linear's (E, D) weight."""
    value = value.t()
    _same_shape(value, target)
    return value, MAPPED, ""


PATCH_BIAS = "patch_embed.proj.bias"


def positions(value: torch.Tensor, target: torch.Tensor, tower: Tower, trunk: VisionTransformer
              ) -> tuple[torch.Tensor, str | None, str]:
    """(1 +) N positions -> the trunk's (1, 1 + N', D): a timm patch bias is added to the patch
    positions (the trunk's patch embedding has none: the same sum), another grid is resampled."""
    value = value.reshape(1, -1, value.shape[-1])
    if value.shape[-1] != target.shape[-1]:
        raise Misfit(f"source width {value.shape[-1]}, here {target.shape[-1]}")
    notes, status = [], None if value.shape == target.shape else MAPPED
    bias = tower.keys.get(PATCH_BIAS)
    if bias is not None:
        value = torch.cat([value[:, :1], value[:, 1:] + bias.to(value.dtype)], dim=1)
        notes.append(f"+ {tower.prefix}{PATCH_BIAS} (the trunk's patch embedding has no bias: the same sum)")
        status = MAPPED
    old = tower.patch_grid(value.shape[1] - 1)
    if old != tuple(trunk.grid_size):
        value = resample_abs_pos_embed(value.float(), list(trunk.grid_size), list(old), num_prefix_tokens=1)
        notes.append(f"grid {old[0]}x{old[1]} -> {trunk.grid_size[0]}x{trunk.grid_size[1]}")
        status = RESIZED
    return value.to(target.dtype), status, "; ".join(notes)


@dataclass(frozen=True)
class Rule:
    """Source key (regex over the tower's relative keys, matched whole) -> trunk key (a
    ``re`` template; ``None``: the weight has no place in the trunk, ``note`` says why, or it is
    folded into the trunk key ``folded_into`` by that key's conversion)."""

    source: str
    target: str | None
    convert: Convert = copy
    note: str = ""
    folded_into: str | None = None


BLOCK = r"transformer\.resblocks\.(\d+)\."
OPEN_CLIP_RULES = (
    Rule(r"conv1\.weight", "patch_embed.weight"),
    Rule(r"class_embedding", "cls_token", reshape),
    Rule(r"positional_embedding", "pos_embed", positions),
    Rule(r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    Rule(BLOCK + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    Rule(BLOCK + r"attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    Rule(BLOCK + r"attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    Rule(BLOCK + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    Rule(BLOCK + r"mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    Rule(BLOCK + r"mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    Rule(r"ln_post\.(weight|bias)", r"norm.\1"),
    Rule(r"proj", "head.weight", transpose),
)
# timm's names are the trunk's (its Block layout) but for the patch embedding's and the
# classifier bias; a dtp_ds trunk is itself (its reducer's weights included).
TIMM_RULES = (
    Rule(r"patch_embed\.proj\.weight", "patch_embed.weight"),
    Rule(re.escape(PATCH_BIAS), None, folded_into="pos_embed"),
    Rule(r"pos_embed", "pos_embed", positions),
    Rule(r"head\.bias", None, note="the trunk's head is bias-free"),
    Rule(r"(.+)", r"\1"),
)
DTP_DS_RULES = (
    Rule(r"pos_embed", "pos_embed", positions),
    Rule(r"(.+)", r"\1"),
)


@dataclass(frozen=True)
class Layout:
    name: str
    marker: str  # a key (relative to the tower) only this layout has
    rules: tuple[Rule, ...]

    def rule_for(self, key: str) -> tuple[Rule, re.Match] | None:
        for rule in self.rules:
            m = re.fullmatch(rule.source, key)
            if m:
                return rule, m
        return None


# In detection order: a prefix an earlier layout claimed is not claimed again (timm ViTs with
# pre_norm also have dtp_ds's marker).
LAYOUTS = (
    Layout("open_clip", "conv1.weight", OPEN_CLIP_RULES),
    Layout("timm", "patch_embed.proj.weight", TIMM_RULES),
    Layout("dtp_ds", "norm_pre.weight", DTP_DS_RULES),
)


def find_towers(source: dict[str, torch.Tensor]) -> list[Tower]:
    """Every vision tower in ``source``, with its layout and prefix."""
    towers: list[Tower] = []
    for layout in LAYOUTS:
        for key in source:
            if not key.endswith(layout.marker):
                continue
            prefix = key[: len(key) - len(layout.marker)]
            if prefix and not prefix.endswith("."):
                continue
            if any(t.prefix == prefix for t in towers):
                continue
            keys = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
            towers.append(Tower(layout, prefix, keys))
    return towers


def named_trunks(model: nn.Module) -> list[tuple[str, VisionTransformer]]:
    """(state-dict prefix, trunk) of every dtp_ds trunk inside ``model``."""
    return [(name + "." if name else "", m) for name, m in model.named_modules() if isinstance(m, VisionTransformer)]


def _match_towers(trunks_: list[tuple[str, VisionTransformer]], towers: list[Tower]) -> dict[str, Tower]:
    """The source tower each trunk takes: the one at its own prefix, else the only one."""
    matched: dict[str, Tower] = {}
    for prefix, _ in trunks_:
        same = [t for t in towers if t.prefix == prefix]
        if same:
            matched[prefix] = same[0]
        elif len(towers) == 1:
            matched[prefix] = towers[0]
        elif towers:
            at = ", ".join(repr(t.prefix) for t in towers)
            raise ValueError(f"the source has {len(towers)} vision towers (at {at}) and none at this trunk's "
                             f"prefix {prefix!r}: which one to take is ambiguous")
    return matched


def _map_trunk(prefix: str, trunk: VisionTransformer, tower: Tower, target: dict[str, torch.Tensor],
               out: dict[str, torch.Tensor], rows: dict[str, Row], used: set[str], why: dict[str, str]) -> None:
    """Fill ``out`` / ``rows`` for one trunk from its tower; ``why``: notes on source weights left unused."""
    folded = []
    for key, value in tower.keys.items():
        found = tower.layout.rule_for(key)
        if found is None:
            continue
        rule, m = found
        src = tower.prefix + key
        if rule.target is None:
            if rule.folded_into:
                folded.append((src, prefix + rule.folded_into))
            why[src] = rule.note
            continue
        dst = prefix + m.expand(rule.target)
        if dst not in target:  # e.g. a block past this trunk's depth, a linear patch kernel into a conv stem
            why[src] = f"no {dst} here"
            continue
        try:
            mapped, status, note = rule.convert(value, target[dst], tower, trunk)
        except Misfit as e:
            rows[dst] = Row(dst, src, FRESH, str(e))
            continue
        out[dst] = mapped.to(target[dst].dtype)
        rows[dst] = Row(dst, src, status or (LOADED if key == dst[len(prefix):] else MAPPED), note)
        used.add(src)
    used.update(src for src, dst in folded if dst in out)


def map_state_dict(model: nn.Module, source: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[Row]]:
    """A complete state dict for ``model`` from ``source`` (any layout of :data:`LAYOUTS`, inside
    a CLIP or alone) and one :class:`Row` per model weight, then per source weight left unused.
    ``ValueError`` when no weight of any trunk comes from the source."""
    target = model.state_dict()
    trunks_ = named_trunks(model)
    towers = find_towers(source)
    matched = _match_towers(trunks_, towers)
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, Row] = {}
    used: set[str] = set()
    why: dict[str, str] = {}
    for prefix, trunk in trunks_:
        if prefix in matched:
            _map_trunk(prefix, trunk, matched[prefix], target, out, rows, used, why)
    # a tower mapped into a trunk is not also loaded by name (a bare open_clip tower's
    # "transformer.resblocks." are not the text tower's)
    taken = {t.prefix + k for t in matched.values() for k in t.keys}
    for key, value in target.items():
        if key in out or key in rows:
            continue
        in_trunk = any(key.startswith(p) for p, _ in trunks_)
        src = None if in_trunk or key in taken else source.get(key)
        if src is not None and src.numel() == value.numel() and (src.shape == value.shape or src.numel() == 1):
            out[key] = src.reshape(value.shape).to(value.dtype)
            rows[key] = Row(key, key, LOADED)
            used.add(key)
        else:
            note = "" if src is None else f"source {tuple(src.shape)}, here {tuple(value.shape)}"
            rows[key] = Row(key, "", FRESH, note)
    for key, row in list(rows.items()):
        if row.status == FRESH:
            out[key] = target[key]
    if trunks_ and not any(r.status in (LOADED, MAPPED, RESIZED) for r in rows.values()
                           if any(r.target.startswith(p) for p, _ in trunks_)):
        found = ", ".join(f"{t.layout.name} at {t.prefix!r}" for t in towers) or "none"
        raise ValueError(f"no weight of the source fits this model's image trunk (vision towers found: {found}); "
                         f"widths, patch size and depth must match a ViT's (positions may differ in grid)")
    ordered = [rows[k] for k in target]
    ordered += [Row("", k, UNUSED, why.get(k, "")) for k in source if k not in used]
    return out, ordered


def counts(rows: list[Row]) -> dict[str, int]:
    """How many weights took each status."""
    return {s: sum(r.status == s for r in rows) for s in STATUSES if any(r.status == s for r in rows)}


def _collapse(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def format_table(rows: list[Row], collapse: bool = False) -> str:
    """The rows as an aligned text table; ``collapse``: one line per (status, layer pattern),
    block indices folded into ``N`` with the indices listed (what gets printed)."""
    if collapse:
        groups: dict[tuple[str, str, str, str], list[str]] = {}
        for r in rows:
            idx = re.findall(r"\.(\d+)\.", r.target or r.source)
            groups.setdefault((_collapse(r.target), _collapse(r.source), r.status, r.note), []).extend(idx[:1])
        lines = [(t, s, st, (f"N in {_span(ix)}" + (f"; {n}" if n else "")) if ix else n)
                 for (t, s, st, n), ix in groups.items()]
    else:
        lines = [(r.target, r.source, r.status, r.note) for r in rows]
    head = ("weight", "from", "status", "note")
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(3)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*x).rstrip() for x in [head, *lines])


def _span(indices: list[str]) -> str:
    nums = sorted({int(i) for i in indices})
    if nums == list(range(nums[0], nums[-1] + 1)) and len(nums) > 1:
        return f"{nums[0]}..{nums[-1]}"
    return ",".join(map(str, nums))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file: safetensors, or a torch file read weights-only (a
    state dict, or one under ``state_dict`` / ``model``, keys with DDP's ``module.`` or not)."""
    from open_clip.factory import load_state_dict

    state: Any = load_state_dict(path, weights_only=True)  # safetensors, "state_dict", "module." (open_clip's)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # timm's training checkpoints
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def warm_start(model: nn.Module, source: dict[str, torch.Tensor]) -> list[Row]:
    """Load ``source`` into ``model`` through :func:`map_state_dict`; returns the rows."""
    state, rows = map_state_dict(model, source)
    model.load_state_dict(state, strict=True)
    return rows


def convert_for_open_clip(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For open_clip's ``load_checkpoint``: a state dict that is not this model's own layout is
    mapped (:func:`map_state_dict`) when the model has a dtp_ds trunk; the table goes to the log."""
    if not named_trunks(model) or set(state) == set(model.state_dict()):
        return state
    mapped, rows = map_state_dict(model, state)
    log.info("warm start into %s: %s\n%s", type(model).__name__, counts(rows), format_table(rows, collapse=True))
    return mapped
