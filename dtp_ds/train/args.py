"""Run settings: typed dataclasses filled from open_clip-style command-line flags.

DeepSpeed settings (batch, ZeRO, precision, clipping) live in the ``--deepspeed_config``
JSON; the flags here that overlap with it (``--batch-size``, ``--precision``, ...) win,
and ``dtp_ds.train.ds_config.resolve`` records every such override.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dtp_ds.data.shards import DataConfig
from dtp_ds.tasks import TASKS, load_task_file, task_type
from dtp_ds.train.schedule import LR_HELP, LR_SCHEDULERS


class ConfigError(ValueError):
    """A run setting that cannot work; the message names the problem and the fix."""


@dataclass
class ModelConfig:
    task: str = "clip"  # a dtp_ds.tasks.TASKS name; its settings are TrainArgs.task_config
    # dtp_ds's trunk in every task (ViT-Tiny-8 is open_clip's own tower under CLIP), with the linear patch
    # stem: every tool and every --seqcomp-schedule (token dropout, patch scaling) takes it
    model: str = "PatchStem-ViT-Tiny-8"
    grad_checkpointing: bool | None = None  # None: on iff the ds_config has "activation_checkpointing"
    reducer_loss_weight: float = 1.0  # each auxiliary loss of the token reducer (DRIP's boundary loss, ...)
    seqcomp_schedule: str | None = None  # FILE.json or SPEC (dtp_ds.train.seqcomp_schedule); None: full-sequence
    seqcomp_costs: str | None = None  # a tools/seqcomp_costs table: the cost of segments without one
    init_from: str | None = None  # warm start: weights file or dtp_ds run (dtp_ds.train.init_from); a resume wins


@dataclass
class OptimConfig:
    lr: float | None = None  # None: the ds_config's optimizer lr
    wd: float | None = None
    warmup: int = 100
    epochs: int = 1
    max_steps: int | None = None  # stop early; the LR schedule still spans --epochs
    grad_clip_norm: float | None = None
    accum_freq: int | None = None  # GradCache chunks per step (the engine's accumulation steps); None: the ds_config's
    lr_scheduler: str = "cosine"  # dtp_ds.train.schedule.LR_SCHEDULERS
    lr_poly_power: float = 2.0  # the polynomial decay's exponent (--lr-scheduler poly)


@dataclass
class RunConfig:
    deepspeed_config: str = ""
    name: str | None = None
    logs: str = "./logs"
    seed: int = 0
    precision: str | None = None  # fp32 | bf16 | fp16; None: the ds_config's
    zero_stage: int | None = None
    batch_size: int | None = None  # micro-batch per rank
    resume: str | None = None  # "latest" or a checkpoint directory
    save_every_n_steps: int = 0
    keep_checkpoints: int = 3
    log_every_n_steps: int = 10
    report_to: str = ""  # "wandb" or ""
    wandb_project_name: str = "dtp_ds"
    eval_frequency: int = 1  # the task's evaluation every N epochs (and at the end of training); 0 turns it off
    eval_max_images: int | None = None  # per evaluation split
    dist_timeout_minutes: float = 5.0
    peer_timeout_seconds: float = 120.0  # dtp_ds.launch.watchdog: a silent peer is named and the job stops
    max_nonfinite_steps: int = 5  # non-finite steps in a row (each skipped) that stop the run
    local_rank: int = -1  # appended by the deepspeed launcher


@dataclass
class TrainArgs:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task_config: Any = None  # the --task's own settings (its Config dataclass, dtp_ds.tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = (ModelConfig, OptimConfig, DataConfig, RunConfig)

# flags renamed in this version: refused with the new name, never silently aliased; old -> (new, why)
_EVAL = "it sets every task's evaluation, not only zero-shot's"
_SEQCOMP = "'compression' is the token reducer's ratio; the training-input strategy is seqcomp"
RENAMED_FLAGS = {"--zeroshot-frequency": ("--eval-frequency", _EVAL),
                 "--zeroshot-max-images": ("--eval-max-images", _EVAL),
                 "--compression-schedule": ("--seqcomp-schedule", _SEQCOMP),
                 "--compression-costs": ("--seqcomp-costs", _SEQCOMP),
                 "--boundary-loss-weight": ("--reducer-loss-weight", "it weights every token reducer's auxiliary "
                                            "losses, not only DRIP's boundary loss")}


class _Renamed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        new, why = RENAMED_FLAGS[option_string]
        raise ConfigError(f"{option_string} was renamed {new} ({why}): use {new}")


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


SEQCOMP_SCHEDULE_HELP = (
    "seqcomp on the image trunk's input in training (never in evaluation) by stage of training: a schedule "
    "JSON ({\"segments\": [{\"fraction\": F, \"r\": R, \"p\": P, \"cost\": C}, ...]}, what the schedule "
    "estimator writes) or a SPEC of FRACTION:STRATEGY joined by ';', a STRATEGY being 'none' or comma-joined "
    "r=RATE (token-drop rate in [0, 1): keep max(1, floor((1 - r) N)) random patches, CLS kept, raster order), "
    "p=PATCH (patch size: the stored kernel PI-resized, positions resampled, images resized to a multiple of "
    "it; linear patch stems only), cost=C (step cost, full-sequence = 1; default: the image tower's estimated "
    "FLOP fraction), e.g. '0.5:r=0.5,p=16;0.3:r=0.25;0.2:none'. Fractions are of the run's steps (--epochs) "
    "and sum to at most 1; what they leave trains full-sequence. Each row of metrics.jsonl logs the step's "
    "seqcomp_r, seqcomp_p, seqcomp_cost and the cumulative cost_units")

ACCUM_FREQ_HELP = (
    "K > 1: each optimizer step trains one contrastive batch of K x --batch-size x world samples in K chunks "
    "(GradCache: exactly the step one batch of that size takes, for one extra forward; sets "
    "gradient_accumulation_steps to K). Without it a ds_config's gradient_accumulation_steps accumulate separate "
    "contrastive batches")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtp_ds.train",
        description="CLIP pretraining (or a classifier: --task classify) under a DeepSpeed engine. Launch with "
        "`deepspeed [--hostfile F | --num_gpus N] --module dtp_ds.train --deepspeed_config ds_configs/X.json ...`",
    )
    a = p.add_argument
    # model
    a("--task", help="what to train: a task name (" + ", ".join(sorted(TASKS)) + "; default clip: contrastive "
      "image-text) or a FILE.py that registers one (dtp_ds.tasks.register_task); each task's flags are in its group")
    a("--model",
      help="open_clip or dtp_ds model name (e.g. ViT-B-32, DRIP-ViT-B-32-10x), or a model JSON path/NAME.json "
      "(default: %(default)s)")
    _bool_flag(p, "--grad-checkpointing", "activation checkpointing per transformer block "
               "(default: on iff the ds_config has an activation_checkpointing section)")
    a("--reducer-loss-weight", type=float,
      help="weight of each auxiliary loss of the token reducer (DRIP's boundary-rate loss, DynamicViT's ratio "
      "and distillation losses, ...)")
    a("--seqcomp-schedule", metavar="FILE|SPEC",
      help=SEQCOMP_SCHEDULE_HELP)
    a("--seqcomp-costs", metavar="FILE",
      help="a cost table of tools/seqcomp_costs (JSON): each --seqcomp-schedule segment without a cost "
      "takes its strategy's measured one (whole CLIP step, full-sequence = 1); a strategy the table lacks is refused")
    a("--init-from", metavar="FILE|RUN",
      help="warm start: an open_clip checkpoint or model file, a timm ViT state dict or a dtp_ds run / checkpoint "
      "directory, mapped into the trunk (boundary predictor and reducer weights start fresh; positions resampled to "
      "another grid); the table of what was loaded, mapped, resized or fresh goes to RUN/init_from.txt. Not applied "
      "when --resume finds a checkpoint (its weights replace it)")
    # data
    a("--train-data",
      help="shards: brace ranges and '::'-joined sources, e.g. 'DIR/{00000..00099}.tar'")
    a("--train-num-samples", type=int, help="samples per epoch (default: from *_stats.json)")
    a("--dataset-resampled", action="store_true", help="sample shards with replacement")
    a("--workers", type=int, help="dataloader workers per rank")
    a("--max-bad-fraction", type=float,
      help="stop when more than this fraction of the data cannot be used "
      "(undecodable or incomplete samples, samples lost with broken shards)")
    # optimisation
    a("--epochs", type=int)
    a("--max-steps", type=int,
      help="stop after this many optimizer steps (the LR schedule still spans --epochs)")
    a("--lr", type=float, help="peak learning rate (default: the ds_config's)")
    a("--wd", type=float, help="weight decay (default: the ds_config's)")
    a("--warmup", type=int, help="linear warmup steps")
    a("--lr-scheduler", choices=list(LR_SCHEDULERS), help=f"{LR_HELP} (default: cosine)")
    a("--lr-poly-power", type=float, help="POWER of --lr-scheduler poly: lr * (1 - t) ** POWER (default 2)")
    a("--grad-clip-norm", type=float, help="gradient clipping norm (default: the ds_config's)")
    a("--accum-freq", type=int, metavar="K", help=ACCUM_FREQ_HELP)
    # DeepSpeed overrides
    a("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
      help="DeepSpeed JSON (default: ds_configs/ for the model's size, e.g. vit_b_32.json for DRIP-ViT-B-32-10x)")
    a("--batch-size", type=int, help="micro-batch per rank (default: the ds_config's)")
    a("--precision", choices=["fp32", "bf16", "fp16"], help="default: the ds_config's")
    a("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default: the ds_config's")
    # run
    a("--name", help="run name (default: date-model-...)")
    a("--logs", help="where runs are written: LOGS/NAME/")
    a("--seed", type=int)
    a("--resume",
      help="'latest' (this run's newest complete checkpoint) or a checkpoint directory")
    a("--save-every-n-steps", type=int, help="also checkpoint every N steps (0: epoch ends only)")
    a("--keep-checkpoints", type=int, help="keep the newest K checkpoints")
    a("--log-every-n-steps", type=int)
    a("--report-to", choices=["", "wandb"],
      help="also log to wandb (WANDB_MODE=offline works without network)")
    a("--wandb-project-name")
    _eval_flags(a)
    a("--dist-timeout-minutes", type=float,
      help="collective timeout: a dead rank stops the others this fast")
    a("--peer-timeout-seconds", type=float,
      help="a rank silent this long (dead or hung) is named and the job stops (0: no watchdog)")
    a("--max-nonfinite-steps", type=int,
      help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    a("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    for old in RENAMED_FLAGS:
        a(old, action=_Renamed, nargs="?", help=argparse.SUPPRESS)
    task_defaults = _task_flags(p)
    # defaults are written once, in the dataclasses
    p.set_defaults(**task_defaults, **{f.name: f.default for cls in SECTIONS for f in dataclasses.fields(cls)
                                       if f.default is not dataclasses.MISSING})
    return p


def _task_flags(p: argparse.ArgumentParser) -> dict[str, Any]:
    """Every registered task's flags, one group per task (a flag two tasks share, e.g.
    --val-data, is declared by the first and must mean the same with the same default); the
    defaults of their destinations, from the tasks' Config dataclasses."""
    defaults: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name in sorted(TASKS):
        cls = TASKS[name]
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        group = p.add_argument_group(f"--task {name}", (cls.__doc__ or "").strip().splitlines()[0])

        def add(*flags: str, _cls=cls, _group=group, _fields=fields, _name=name, **kw: Any) -> None:
            dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
            if dest not in _fields:
                raise TypeError(f"task {_name}: flag {flags[0]} sets {dest}, which is not a field of "
                                f"{_cls.Config.__name__}")
            f = _fields[dest]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dest in owner:
                if defaults[dest] != default:
                    raise TypeError(f"tasks {owner[dest]} and {_name} both declare {flags[0]} with different "
                                    f"defaults ({defaults[dest]!r}, {default!r})")
                return
            owner[dest], defaults[dest] = _name, default
            _group.add_argument(*flags, **kw)

        cls.add_flags(add)
    return defaults


def _eval_flags(a) -> None:
    """The evaluation's schedule (what is evaluated is the task's: its group's flags)."""
    a("--eval-frequency", type=int, help="the task's evaluation every N epochs and at the end (0: never)")
    a("--eval-max-images", type=int, help="evaluate on at most this many images per split")


def task_from_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with a ``--task FILE.py`` imported (it registers its task, flags included, before
    the parser is built) and replaced by the name it registered."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        value, at = (argv[i + 1], i + 1) if arg == "--task" and i + 1 < len(argv) else \
            (arg.split("=", 1)[1], i) if arg.startswith("--task=") else (None, None)
        if value is not None and value.endswith(".py"):
            try:
                name = load_task_file(value)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            argv[at] = name if at != i else f"--task={name}"
    return argv


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    import sys

    argv = task_from_argv(sys.argv[1:] if argv is None else argv)
    return from_namespace(build_parser().parse_args(argv))


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """The checked run settings of a :func:`build_parser` namespace (a tool's parser may add flags)."""
    v = vars(ns)

    def take(cls):
        return cls(**{f.name: v[f.name] for f in dataclasses.fields(cls)})

    try:
        cls = task_type(v["task"])
    except ValueError as e:
        raise ConfigError(f"--task {v['task']}: {e}") from e
    check_foreign_flags(v, cls)
    args = TrainArgs(*(take(c) for c in SECTIONS), task_config=take(cls.Config))
    check_args(args)
    return args


def check_foreign_flags(v: dict[str, Any], chosen: type) -> None:
    """A flag of another task, set to other than its default, is refused: it would do nothing."""
    def norm(x):  # nargs=2 parses to a list, a default may be a tuple
        return list(x) if isinstance(x, tuple | list) else x

    own = {f.name for f in dataclasses.fields(chosen.Config)}
    given = {}
    for name, cls in TASKS.items():
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name not in own and f.name in v and norm(v[f.name]) != norm(default):
                given.setdefault("--" + f.name.replace("_", "-"), name)
    if given:
        flags = ", ".join(f"{flag} (--task {t})" for flag, t in given.items())
        raise ConfigError(f"{flags}: not flags of --task {chosen.name}; drop them or choose that task")


def check_args(args: TrainArgs) -> None:
    """Checks that need no files and no world size."""
    if not args.data.train_data:
        raise ConfigError("--train-data is required: e.g. --train-data 'data/synth/train/{00000..00019}.tar'")
    o = args.optim
    if o.epochs < 1:
        raise ConfigError(f"--epochs {o.epochs}: must be >= 1")
    if o.accum_freq is not None and o.accum_freq < 1:
        raise ConfigError(f"--accum-freq {o.accum_freq}: must be >= 1")
    if o.max_steps is not None and o.max_steps < 1:
        raise ConfigError(f"--max-steps {o.max_steps}: must be >= 1")
    if not o.lr_poly_power > 0:
        raise ConfigError(f"--lr-poly-power {o.lr_poly_power}: must be > 0 (2: the quadratic decay)")
    if o.warmup < 0:
        raise ConfigError(f"--warmup {o.warmup}: must be >= 0")
    if args.run.keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints must be >= 1 (the newest checkpoint is always kept)")
    if args.run.batch_size is not None and args.run.batch_size < 1:
        raise ConfigError(f"--batch-size {args.run.batch_size}: must be >= 1")
    if args.run.max_nonfinite_steps < 1:
        raise ConfigError(f"--max-nonfinite-steps {args.run.max_nonfinite_steps}: must be >= 1")
    if not 0.0 <= args.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max-bad-fraction {args.data.max_bad_fraction}: must be in [0, 1]")
    try:
        task_type(args.model.task).check(args.task_config)
    except ValueError as e:
        raise ConfigError(str(e)) from e
