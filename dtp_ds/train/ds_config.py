"""The DeepSpeed config of a run: the ``--deepspeed_config`` JSON with the flags applied.

A flag that disagrees with the JSON wins; each such change is recorded (key, JSON value,
flag value) and saved in the run's ``config.json``. Batch arithmetic is checked against
the world size before anything is written.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from importlib import resources
from typing import Any

from dtp_ds.train.args import ConfigError, TrainArgs

log = logging.getLogger(__name__)

# open_clip's trainer defaults for ViT CLIP (betas 0.9/0.98, eps 1e-6, wd 0.2), as torch's fused
# AdamW (CPU and CUDA; faster than the per-tensor loop on both).
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6,
                                                   "weight_decay": 0.2, "torch_adam": True, "fused": True}}


# Package data (dtp_ds/ds_configs/; the checkout's ds_configs/ is a link to it), found through
# importlib.resources so an installed copy resolves its own. pip installs unpacked, so the
# resource is a real file whose path DeepSpeed can open.
DS_CONFIG_RESOURCE = "ds_configs"


def shipped_ds_config(name: str) -> str:
    """Path of the shipped DeepSpeed config ``name`` (``tiny.json``)."""
    return str(resources.files("dtp_ds").joinpath(DS_CONFIG_RESOURCE).joinpath(name))


def default_ds_config(model: str, bf16: bool = True) -> str:
    """ds_configs/<size>.json for a model's trunk size, whatever its reducer family
    (DRIP-ViT-L-14-10x, ToMe-ViT-L-14, DRIPGumbel-ViT-L-14-4x -> vit_l_14.json), the tiny models
    tiny.json; on devices without bf16 (``bf16=False``: V100s) the fp16 variant (vit_l_14_fp16.json)."""
    m = re.match(r"^(?:[A-Za-z]+-)?ViT-([A-Za-z]+)-(\d+)", os.path.basename(model))
    if m is None:
        raise ConfigError(f"no default DeepSpeed config for model '{model}': pass --deepspeed_config")
    size, patch = m.group(1).lower(), m.group(2)
    name = "tiny" if size == "tiny" else f"vit_{size}_{patch}" + ("" if bf16 else "_fp16")
    path = shipped_ds_config(f"{name}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no DeepSpeed config for model '{model}' ({path} does not exist): "
                          f"pass --deepspeed_config")
    return path


# The keys of DeepSpeed's ``activation_checkpointing`` section: what each asks for that dtp_ds does
# not do, and what to do instead where there is something. dtp_ds checkpoints every ViT block with
# torch.utils.checkpoint (non-reentrant; ``VisionTransformer.set_grad_checkpointing``), keeping each
# block's input on the device: the section switches that on and nothing else, so an option that
# asks for more is refused rather than ignored. Off (false; null for number_checkpoints) is accepted.
CHECKPOINTING_OPTIONS: dict[str, tuple[str, str]] = {
    "partition_activations": ("splitting the saved activations over model-parallel ranks (dtp_ds has no model "
                              "parallelism)", ""),
    "cpu_checkpointing": ("moving the saved block inputs to CPU memory",
                          "to fit a larger tower, lower train_micro_batch_size_per_gpu and raise --accum-freq, or "
                          "offload the optimizer with ZeRO: tools/autotune_batch finds a setup that fits"),
    "contiguous_memory_optimization": ("copying the checkpoints into one preallocated buffer", ""),
    "number_checkpoints": ("sizing that buffer (every block is checkpointed)", ""),
    "synchronize_checkpoint_boundary": ("synchronising the device at every checkpoint", ""),
    "profile": ("timing DeepSpeed's checkpoint calls", "time a training step with tools/bench"),
}


def _checkpointing_option_on(value: Any) -> bool:
    """Whether an ``activation_checkpointing`` option asks for something (false and null do not)."""
    return value is not None and value is not False


def _option_problem(key: str, value: Any) -> str:
    what, instead = CHECKPOINTING_OPTIONS[key]
    off = "null" if key == "number_checkpoints" else "false"
    return (f"activation_checkpointing.{key} is {json.dumps(value)}: {what} is not done by dtp_ds, which would "
            f"ignore it; remove it or set it to {off}" + (f"; {instead}" if instead else ""))


def check_activation_checkpointing(cfg: dict[str, Any], where: str) -> None:
    """Refuse an ``activation_checkpointing`` section with options dtp_ds would otherwise ignore
    (see :data:`CHECKPOINTING_OPTIONS`), naming each; ``where``: the config, for the message."""
    section = cfg.get("activation_checkpointing")
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: activation_checkpointing must be a JSON object (an empty one, {{}}, turns "
                          f"per-block checkpointing on), not {section!r}")
    unknown = sorted(set(section) - set(CHECKPOINTING_OPTIONS))
    problems = [f"activation_checkpointing.{key} is not a DeepSpeed option (known: "
                f"{', '.join(CHECKPOINTING_OPTIONS)}): remove it" for key in unknown]
    problems += [_option_problem(key, section[key]) for key in CHECKPOINTING_OPTIONS
                 if _checkpointing_option_on(section.get(key))]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ". The section alone turns on activation "
                          "checkpointing of every block, inputs kept on the device.")


def load_ds_config(path: str) -> dict[str, Any]:
    """The ``--deepspeed_config`` JSON, checked for what dtp_ds would otherwise ignore."""
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: no such file (the shipped ones are in ds_configs/)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object")
    check_activation_checkpointing(cfg, f"--deepspeed_config {path}")
    return cfg


def precision_of(cfg: dict[str, Any]) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


class _Resolver:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = copy.deepcopy(cfg)
        self.overrides: list[dict[str, Any]] = []

    def set(self, path: str, value: Any, flag: str) -> None:
        """Set dotted ``path`` to ``value``; record it when the JSON said otherwise."""
        *parents, leaf = path.split(".")
        node = self.cfg
        for p in parents:
            node = node.setdefault(p, {})
        old = node.get(leaf)
        if old != value:
            node[leaf] = value
            self.overrides.append({"key": path, "ds_config": old, "flag": flag, "value": value})


def resolve_batch(cfg: dict[str, Any], args: TrainArgs, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps) after the flags, checked."""
    micro = args.run.batch_size or cfg.get("train_micro_batch_size_per_gpu")
    accum = args.optim.accum_freq or cfg.get("gradient_accumulation_steps") or 1
    total = cfg.get("train_batch_size")
    flags_set_batch = args.run.batch_size is not None or args.optim.accum_freq is not None
    if micro is None:
        if total is None:
            raise ConfigError("no batch size: give --batch-size or train_micro_batch_size_per_gpu in the ds_config")
        if total % (accum * world_size):
            raise ConfigError(
                f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} x "
                f"world size {world_size}: set train_micro_batch_size_per_gpu or --batch-size")
        micro = total // (accum * world_size)
    if total is not None and not flags_set_batch and total != micro * accum * world_size:
        raise ConfigError(
            f"batch sizes do not multiply out: train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size} = {micro * accum * world_size}, "
            f"but train_batch_size is {total}. Fix the ds_config, drop train_batch_size (it is derived), "
            f"or pass --batch-size / --accum-freq.")
    return int(micro), int(accum)


# CPU flags of native bf16 arithmetic: x86 (/proc/cpuinfo "flags"): AVX512-BF16, AMX-BF16;
# aarch64 ("Features"): the BF16 extension.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FEATURES = ("bf16",)


def _cpu_flags(cpuinfo: str) -> tuple[str, set[str]] | None:
    """("x86" or "arm", the first CPU's flags) from /proc/cpuinfo text; None if it lists none."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return ("x86" if name.strip() == "flags" else "arm"), set(value.split())
    return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, the BF16 extension on
    aarch64). Without it (AVX2 only: most laptops, AMD EPYC before Zen 4; AVX-512 without
    AVX512-BF16: Xeons before Cooper Lake) oneDNN emulates bf16 matmuls, several times slower
    than fp32.

    Decided by the CPU's flags (``cpuinfo``: /proc/cpuinfo's text, read when None), not by
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which is True on every AVX-512 CPU,
    emulated or not. Only where the flags cannot be read (not Linux) does oneDNN's answer count."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags = _cpu_flags(cpuinfo)
    if flags is not None:
        arch, have = flags
        return bool(have.intersection(X86_BF16_FLAGS if arch == "x86" else ARM_BF16_FEATURES))
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(raw: dict[str, Any], args: TrainArgs, world_size: int,
            cpu_bf16: bool | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ds_config to hand ``deepspeed.initialize``, and the list of flag overrides.

    ``cpu_bf16``: ``None`` off CPU; on CPU whether bf16 is native there. Where it is not, a
    ds_config's bf16 becomes fp32 unless ``--precision bf16`` asks for it (then it runs, with
    a warning)."""
    r = _Resolver(raw)
    micro, accum = resolve_batch(raw, args, world_size)
    r.set("train_micro_batch_size_per_gpu", micro, "--batch-size")
    r.set("gradient_accumulation_steps", accum, "--accum-freq")
    r.set("train_batch_size", micro * accum * world_size, "derived: micro x accum x world size")

    if args.run.precision is not None:
        r.set("bf16.enabled", args.run.precision == "bf16", "--precision")
        r.set("fp16.enabled", args.run.precision == "fp16", "--precision")
    elif cpu_bf16 is False and precision_of(r.cfg) == "bf16":
        r.set("bf16.enabled", False, "CPU without native bf16 (AVX512-BF16 / AMX): fp32 (--precision bf16 forces it)")
    if cpu_bf16 is False and precision_of(r.cfg) == "bf16":
        log.warning("bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): its matmuls are emulated, "
                    "tens of times slower than fp32 here; --precision fp32 trains faster")
    if args.run.zero_stage is not None:
        r.set("zero_optimization.stage", args.run.zero_stage, "--zero-stage")
    if args.optim.grad_clip_norm is not None:
        r.set("gradient_clipping", args.optim.grad_clip_norm, "--grad-clip-norm")

    if "optimizer" not in r.cfg:
        r.cfg["optimizer"] = copy.deepcopy(DEFAULT_OPTIMIZER)
    if args.optim.lr is not None:
        r.set("optimizer.params.lr", args.optim.lr, "--lr")
    if args.optim.wd is not None:
        r.set("optimizer.params.weight_decay", args.optim.wd, "--wd")

    # The LR schedule is dtp_ds's own (dtp_ds.train.schedule), built from --warmup/--epochs:
    # a scheduler section in the JSON would compete with it.
    if "scheduler" in r.cfg:
        r.overrides.append({"key": "scheduler", "ds_config": r.cfg.pop("scheduler"), "flag": "--warmup/--epochs",
                            "value": "dtp_ds.train.schedule.warmup_decay_lr"})

    if precision_of(r.cfg) == "fp16" and "loss_scale" not in r.cfg["fp16"]:
        r.cfg["fp16"]["loss_scale"] = 0  # 0: dynamic loss scaling
    r.cfg.setdefault("steps_per_print", 10**9)  # dtp_ds logs itself
    return r.cfg, r.overrides


def grad_checkpointing_on(cfg: dict[str, Any], args: TrainArgs) -> bool:
    """The flag, else whether the ds_config asks for activation checkpointing."""
    if args.model.grad_checkpointing is not None:
        return args.model.grad_checkpointing
    return "activation_checkpointing" in cfg
