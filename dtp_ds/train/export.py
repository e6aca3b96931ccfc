"""Load a trained model out of a dtp_ds checkpoint as a plain fp32 open_clip model.

A checkpoint ``LOGS/NAME/checkpoints/step_N/`` is DeepSpeed's: where the fp32 weights live
depends on the ZeRO stage and the precision.

* **stages 1-3**: the fp32 master weights are in the ZeRO optimizer files
  (``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``, one partition per rank), merged by
  DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``. The module weights in the
  model-states file are the 16-bit copies (stages 1-2) or empty placeholders (stage 3).
* **stage 0, fp32**: ``module`` in ``mp_rank_00_model_states.pt`` holds the fp32 weights.
* **stage 0, bf16/fp16**: ``module`` holds the 16-bit copies; DeepSpeed's (unfused) fp16
  optimizer wrapper keeps the fp32 masters under ``optimizer`` in the same file, per
  parameter group (``fp32_groups``, or one flat tensor per group ``fp32_groups_flat`` for the
  fused one) without parameter names. They are named by rebuilding the trainer's parameter
  groups (:func:`dtp_ds.tasks.param_groups`) and used only if every master matches its
  16-bit copy in shape and, cast to 16 bits, in value; otherwise the 16-bit copies are
  upcast, with a warning.

The trainer wraps the model in its task's module (:class:`~dtp_ds.tasks.clip.CLIPModule`,
:class:`~dtp_ds.tasks.classify.ClassifyModule`), so state-dict keys carry a ``model.`` prefix,
stripped here. The model name and its open_clip config come from the checkpoint's client state
(``model_name``, ``model_cfg``); a ``--task classify`` checkpoint (``task``, ``num_classes``)
holds the image trunk alone with its classifier head (:func:`dtp_ds.models.vision_tower`),
which is what loads and exports.

Every file is read with ``torch.load(weights_only=True)`` except by DeepSpeed's ZeRO merger
(``zero_to_fp32``), which unpickles with ``weights_only=False``: the checkpoint directory is
first verified with the weights-only loader (:func:`dtp_ds.train.checkpoint.verify_weights_only`).

:func:`export_safetensors` (``tools/export_checkpoint``) writes the fp32 (or bf16) weights as
one safetensors file that ``open_clip.create_model(name, pretrained=FILE)`` loads after
``import dtp_ds``; the model name and config ride in its metadata (:func:`load_exported`).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import logging
import os
import sys
from typing import Any

import open_clip
import torch
from torch import nn

import dtp_ds  # (importing it registers the dtp_ds model configs with open_clip)
from dtp_ds.models import get_model_config, register_config
from dtp_ds.train.checkpoint import (
    PARTIAL,
    TAG_RE,
    CheckpointError,
    checkpoint_root,
    committed_dir,
    latest_tag,
    list_checkpoints,
    verify_weights_only,
)

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
STAGE3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
STATES = "mp_rank_00_model_states.pt"


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATES)) or os.path.isfile(os.path.join(path, STAGE3_STATES))


def _from_root(root: str, given: str) -> str:
    tag = latest_tag(root)
    if tag is None:
        found = [t for _, t in list_checkpoints(root)]
        hint = f" (it has {', '.join(found)}: pass one of them)" if found else ""
        raise FileNotFoundError(f"{given}: {os.path.join(root, 'latest')} is missing or empty, so there is no "
                                f"complete checkpoint to load{hint}")
    ckpt = os.path.join(root, committed_dir(root, tag))
    if not _is_checkpoint_dir(ckpt):
        raise FileNotFoundError(f"{given}: 'latest' names {tag}, but {ckpt} holds no {STATES} or {STAGE3_STATES}")
    return ckpt


def resolve_checkpoint_dir(path: str) -> str:
    """The checkpoint directory for a run directory (``LOGS/NAME``), a checkpoints root (with
    a ``latest`` file) or a checkpoint directory (``.../checkpoints/step_N``)."""
    full = os.path.abspath(path.rstrip("/") or "/")
    if not os.path.exists(full):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not os.path.isdir(full):
        raise ValueError(f"{path} is a file: give a run directory (LOGS/NAME), its checkpoints/ directory "
                         f"or one checkpoint directory (checkpoints/step_N)")
    if full.endswith(PARTIAL):
        raise FileNotFoundError(f"{path}: an incomplete checkpoint (its save never finished or failed): use a "
                                f"committed one (the run directory picks the one 'latest' names)")
    if _is_checkpoint_dir(full):
        return full
    if os.path.isfile(os.path.join(full, "latest")) or list_checkpoints(full):
        return _from_root(full, path)
    if os.path.isdir(checkpoint_root(full)):
        return _from_root(checkpoint_root(full), path)
    if TAG_RE.match(os.path.basename(full)):
        raise FileNotFoundError(f"{path}: checkpoint directory without {STATES} or {STAGE3_STATES} "
                                f"(incomplete or not a DeepSpeed checkpoint)")
    runs = sorted(d for d in os.listdir(full) if os.path.isdir(checkpoint_root(os.path.join(full, d))))
    hint = f" (runs in it: {', '.join(runs)})" if runs else ""
    raise FileNotFoundError(f"{path} is not a dtp_ds checkpoint: no {STATES} or {STAGE3_STATES}, no 'latest' "
                            f"file and no checkpoints/ directory{hint}")


def read_model_states(ckpt_dir: str) -> dict[str, Any]:
    """Rank 0's model-states file of a checkpoint: module weights, ds_config, client state."""
    for name in (STATES, STAGE3_STATES):
        file = os.path.join(ckpt_dir, name)
        if os.path.isfile(file):
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{ckpt_dir}: no {STATES} or {STAGE3_STATES}")


def zero_stage(ckpt_dir: str, states: dict[str, Any]) -> int:
    """The ZeRO stage the checkpoint was written with (from its ds_config, else its files)."""
    stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    if stage is not None:
        return int(stage)
    if os.path.isfile(os.path.join(ckpt_dir, STAGE3_STATES)):
        return 3
    return 2 if glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt")) else 0


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The task's model's weights: the module's ``model.`` entries, prefix stripped (the rest of
    a task's module, e.g. an SSL task's heads and momentum encoder, is not the exported model)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def _zero_fp32_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """fp32 masters of a ZeRO (stage 1-3) checkpoint, merged over the ranks' partitions."""
    # A first import of deepspeed logs its accelerator choice to stdout: send it to stderr,
    # stdout is for the callers' results (tools print one line per output file).
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = io.StringIO()
    # DeepSpeed's loader prints progress; keep it for the debug log. It reads the optimizer
    # and model-states files with torch.load(weights_only=False): verify them first.
    verify_weights_only(ckpt_dir)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    log.debug("zero_to_fp32: %s", out.getvalue())
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _stage0_masters(states: dict[str, Any], model: nn.Module, module: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor] | None:
    """Named fp32 masters of DeepSpeed's (un)fused fp16 optimizer wrapper (stage 0 in
    bf16/fp16), or None (with a warning) when they cannot be matched to the 16-bit weights."""
    from dtp_ds.tasks import param_groups
    from dtp_ds.tasks.clip import CLIPModule

    opt = states.get("optimizer") or {}
    if "fp32_groups" in opt:
        groups = [list(g) for g in opt["fp32_groups"]]
    elif "fp32_groups_flat" in opt:
        groups = [[g] for g in opt["fp32_groups_flat"]]  # split below, once the shapes are known
    else:
        log.warning("stage-0 16-bit checkpoint without fp32 masters in its model states (optimizer keys: %s)",
                    sorted(opt))
        return None
    # the trainer's wrapper: the same parameter names and groups (every task's module holds only
    # its model's parameters, under "model.")
    task = CLIPModule(model)
    names = {id(p): n for n, p in task.named_parameters()}
    named = [[names[id(p)] for p in g["params"]] for g in param_groups(task, 0.0)]
    if len(named) != len(groups):
        log.warning("stage-0 masters: %d parameter groups in the checkpoint, %d rebuilt", len(groups), len(named))
        return None
    masters: dict[str, torch.Tensor] = {}
    for group_names, tensors in zip(named, groups):
        if "fp32_groups_flat" in opt:
            flat = tensors[0]
            sizes = [module[n].numel() if n in module else -1 for n in group_names]
            if min(sizes, default=0) < 0 or sum(sizes) != flat.numel():
                log.warning("stage-0 masters: a flat group of %d values does not fit the rebuilt group", flat.numel())
                return None
            tensors = [t.view(module[n].shape) for t, n in zip(flat.split(sizes), group_names)]
        if len(tensors) != len(group_names):
            log.warning("stage-0 masters: group of %d tensors, %d parameters rebuilt", len(tensors), len(group_names))
            return None
        for name, master in zip(group_names, tensors):
            low = module.get(name)
            if low is None or low.shape != master.shape or not torch.equal(master.to(low.dtype), low):
                log.warning("stage-0 masters: %s does not match its 16-bit copy", name)
                return None
            masters[name] = master.float()
    return masters


def _stage0_state(states: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a stage-0 checkpoint: the module (fp32), or the optimizer's fp32 masters."""
    module = states.get("module")
    if not module:
        raise ValueError("stage-0 checkpoint without module weights in its model states")
    low = {v.dtype for v in module.values() if v.is_floating_point() and v.dtype != torch.float32}
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if not low:
        return upcast
    masters = _stage0_masters(states, model, module)
    if masters is None:
        log.warning("using the %s module weights upcast to fp32: the fp32 masters could not be read", low)
        return upcast
    return {**upcast, **masters}  # buffers (if any) from the module


def fp32_state_dict(ckpt_dir: str, model: nn.Module, states: dict[str, Any] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights of the task's model, keys as in ``model.state_dict()`` (the
    ``model.`` prefix of the trainer's task wrapper stripped; the module's other parts left out).
    ``model``: a model of the same architecture (names the stage-0 16-bit masters)."""
    return _strip(module_fp32_state(ckpt_dir, model, states))


def module_fp32_state(ckpt_dir: str, model: nn.Module, states: dict[str, Any] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights of the trainer's whole task module, keys as in its
    ``state_dict()`` (``model.*`` and, for an SSL task, its heads and momentum encoder)."""
    states = read_model_states(ckpt_dir) if states is None else states
    stage = zero_stage(ckpt_dir, states)
    if stage == 0:
        return _stage0_state(states, model)
    if stage in (1, 2, 3):
        if not glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt")):
            raise FileNotFoundError(f"{ckpt_dir}: ZeRO stage {stage} checkpoint without its "
                                    f"*zero_pp_rank_*_optim_states.pt files (where the fp32 weights are)")
        merged = _zero_fp32_state(ckpt_dir)
        # a parameter the optimizer never held (frozen: MoCo v3's patch projection) has no fp32
        # master: ZeRO-2/3 save it apart (merged above), ZeRO-1 only in the module's weights,
        # its one copy (the module's dtype; ZeRO-3's module entries are empty placeholders)
        frozen = {k: v.float() if v.is_floating_point() else v for k, v in (states.get("module") or {}).items()
                  if k not in merged and v.numel()}
        return {**frozen, **merged}
    raise ValueError(f"{ckpt_dir}: unknown ZeRO stage {stage}")


def _register_model(name: str, cfg: dict[str, Any] | None, ckpt_dir: str) -> None:
    """Make the checkpoint's model name buildable by open_clip (its stored config wins)."""
    known = get_model_config(name) if name in open_clip.list_models() else None
    if cfg is None:
        if known is None:
            raise ValueError(f"{ckpt_dir}: model '{name}' is unknown to open_clip and the checkpoint stores no "
                             f"model_cfg")
        return
    # the registered config, or open_clip's form of it (a DRIP trunk as a registered timm model:
    # what checkpoints stored before get_model_config), which must not replace the dtp_ds form that
    # every other reader of the name (vision_tower, the tasks) builds from
    if known == cfg or (known is not None and cfg == open_clip.get_model_config(name)):
        return
    if known is not None:
        log.warning("model '%s': the checkpoint's config differs from the registered one; using the checkpoint's",
                    name)
    trunk = cfg.get("vision_cfg", {}).get("timm_model_name")
    if trunk and trunk.startswith("dtp_"):
        import timm

        if not timm.is_model(trunk):
            # open_clip's form of a DRIP config (drip_cfg replaced by a timm trunk registered at
            # run time; what checkpoints stored before get_model_config): the trunk must exist.
            raise ValueError(f"{ckpt_dir}: model '{name}' needs the DRIP trunk '{trunk}', which is not registered "
                             f"here; register its DRIP config first (dtp_ds.models.register_config(name, cfg) "
                             f"with the config that has vision_cfg.drip_cfg)")
    register_config(name, cfg)


def build_model(name: str, task: str = "clip", client_state: dict[str, Any] | None = None) -> nn.Module:
    """The model a run of ``task`` trains, as the trainer builds it (weights fresh), from what the
    task recorded in the checkpoint (:meth:`dtp_ds.tasks.Task.client_state`)."""
    from dtp_ds.tasks import task_type

    return task_type(task).build_model(name, client_state or {})


def task_client_state(states: dict[str, Any]) -> dict[str, Any]:
    """What the run's task recorded to rebuild its model (``task_state``; checkpoints from before
    the task seam kept a classifier's ``num_classes`` at the top)."""
    if "task_state" in states:
        return dict(states["task_state"] or {})
    return {"num_classes": states["num_classes"]} if states.get("num_classes") else {}


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """(fp32 model in eval mode on ``device``, model name) from a run directory (``LOGS/NAME``,
    newest complete checkpoint), a checkpoints root or one checkpoint directory; any ZeRO stage
    and precision. The model is an open_clip CLIP, or for a ``--task classify`` run the classifier."""
    ckpt_dir = resolve_checkpoint_dir(path)
    states = read_model_states(ckpt_dir)
    name = states.get("model_name")
    if not name:
        raise ValueError(f"{ckpt_dir}: the checkpoint's client state has no 'model_name' (not written by dtp_ds.train)")
    _register_model(name, states.get("model_cfg"), ckpt_dir)
    model = build_model(name, states.get("task") or "clip", task_client_state(states))
    state = fp32_state_dict(ckpt_dir, model, states)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: weights do not fit model '{name}': missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{ckpt_dir}: weights do not fit model '{name}': {e}") from e
    return model.float().to(device).eval(), name


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def exportable_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's state dict as open_clip's default models hold it: the trainer's
    1-element ``logit_scale`` (``nonscalar_logit_scale``) back to 0-dim, floating tensors in
    ``dtype``, each its own contiguous tensor (safetensors refuses shared storage)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k in ("logit_scale", "logit_bias") and v.numel() == 1:
            v = v.reshape(())
        out[k] = (v.to(dtype) if v.is_floating_point() else v).clone().contiguous()
    return out


def export_safetensors(path: str, out: str, dtype: str = "fp32") -> tuple[str, str, dict[str, str]]:
    """Export the checkpoint ``path`` (run directory, checkpoints root or step directory; any
    ZeRO stage and precision) to the safetensors file ``out``, written atomically. Returns
    (checkpoint directory, model name, metadata)."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: one of {', '.join(EXPORT_DTYPES)}")
    ckpt_dir = resolve_checkpoint_dir(path)
    model, name = load_model_from_checkpoint(ckpt_dir)
    states = read_model_states(ckpt_dir)
    train_state = (states.get("train_state") or {})
    meta = {"format": "pt", "model_name": name, "model_cfg": json.dumps(get_model_config(name)),
            "dtype": dtype, "dtp_ds_version": dtp_ds.__version__, "checkpoint": os.path.basename(ckpt_dir),
            "step": str(train_state.get("step", "")), "task": states.get("task") or "clip",
            "client_state": json.dumps(task_client_state(states))}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        save_file(exportable_state(model, EXPORT_DTYPES[dtype]), tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ckpt_dir, name, meta


def exported_metadata(file: str) -> dict[str, str]:
    """The metadata of an exported safetensors file (nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(file: str, **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(name, pretrained=file)`` for an exported file, the model name
    and config taken from its metadata (registered first if open_clip does not know it); an
    exported classifier (``task`` classify) is built by :func:`build_model` and loaded strictly
    (``kwargs`` are open_clip's)."""
    meta = exported_metadata(file)
    name = meta.get("model_name")
    if not name:
        raise ValueError(f"{file}: no model_name in its safetensors metadata (not written by tools/export_checkpoint)")
    cfg = json.loads(meta["model_cfg"]) if meta.get("model_cfg") else None
    if name not in open_clip.list_models() or (cfg is not None and get_model_config(name) != cfg):
        _register_model(name, cfg, file)
    if meta.get("task") not in (None, "", "clip"):
        from safetensors.torch import load_file

        # client_state: what the task recorded (exports before it held num_classes alone)
        state = json.loads(meta["client_state"]) if meta.get("client_state") else \
            {"num_classes": int(meta["num_classes"])}
        model = build_model(name, meta["task"], state)
        model.load_state_dict(load_file(file))
        return model
    return open_clip.create_model(name, pretrained=file, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``tools/export_checkpoint``: one line per export on stdout."""
    p = argparse.ArgumentParser(
        prog="export_checkpoint",
        description="Export a dtp_ds DeepSpeed checkpoint (any ZeRO stage and precision) to one safetensors file "
                    "that open_clip.create_model(NAME, pretrained=FILE) loads after `import dtp_ds`.")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (LOGS/NAME: the checkpoint 'latest' names), checkpoints/ or checkpoints/step_N")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32", help="weights' dtype in the file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not a.out.endswith(".safetensors"):
        p.error("--out must end in .safetensors (open_clip picks the loader by the suffix)")
    try:
        ckpt_dir, name, meta = export_safetensors(a.checkpoint, a.out, a.dtype)
    except (FileNotFoundError, ValueError, CheckpointError, OSError) as e:
        print(f"export_checkpoint: error: {e}", file=sys.stderr)
        return 2
    how = (f"`from dtp_ds.train.export import load_exported; load_exported({a.out!r})` (a --task {meta['task']} "
           f"model)" if meta["task"] != "clip" else
           f"`import dtp_ds, open_clip; open_clip.create_model({name!r}, pretrained={a.out!r})`")
    print(f"{a.out}: {name} ({meta['dtype']}) from {ckpt_dir}; load with {how}", flush=True)
    return 0
