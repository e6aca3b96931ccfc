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
from dtp_ds.tasks.classify import ClassifyConfig
from dtp_ds.train.schedule import LR_HELP, LR_SCHEDULERS


class ConfigError(ValueError):
    """A run setting that cannot work; the message names the problem and the fix."""


@dataclass
class ModelConfig:
    task: str = "clip"  # dtp_ds.tasks.TASKS
    model: str = "ViT-Tiny-8"
    grad_checkpointing: bool | None = None  # None: on iff the ds_config has "activation_checkpointing"
    local_loss: bool = False
    gather_with_grad: bool = False
    boundary_loss_weight: float = 1.0  # each auxiliary loss of the token reducer (DRIP's boundary loss)
    compression_schedule: str | None = None  # FILE.json or SPEC (dtp_ds.train.compression_schedule); None: uncompressed
    compression_costs: str | None = None  # a tools/compression_costs table: the cost of segments without one
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
    zeroshot_frequency: int = 1  # every N epochs (and at the end of training); 0 turns it off
    zeroshot_data: str | None = None  # class-folder dir with classnames.json / templates.json
    zeroshot_extra: list[str] | None = None  # more such splits, logged as NAME_top1, ...
    imagenet_val: str | None = None  # ImageNet-1k val in class-folder layout
    zeroshot_max_images: int | None = None
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
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = (ModelConfig, OptimConfig, DataConfig, RunConfig, ClassifyConfig)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


COMPRESSION_SCHEDULE_HELP = (
    "compress the image trunk's input in training (evaluation never is) by stage of training: a schedule "
    "JSON ({\"segments\": [{\"fraction\": F, \"r\": R, \"p\": P, \"cost\": C}, ...]}, what the schedule "
    "estimator writes) or a SPEC of FRACTION:STRATEGY joined by ';', a STRATEGY being 'none' or comma-joined "
    "r=RATE (token-drop rate in [0, 1): keep max(1, floor((1 - r) N)) random patches, CLS kept, raster order), "
    "p=PATCH (patch size: the stored kernel PI-resized, positions resampled, images resized to a multiple of "
    "it; linear patch stems only), cost=C (step cost, uncompressed = 1; default: the image tower's estimated "
    "FLOP fraction), e.g. '0.5:r=0.5,p=16;0.3:r=0.25;0.2:none'. Fractions are of the run's steps (--epochs) "
    "and sum to at most 1; what they leave trains uncompressed. Each row of metrics.jsonl logs the step's "
    "compression_r, compression_p, compression_cost and the cumulative cost_units")

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
    a("--task", help="what to train: clip (contrastive image-text; the default) or classify (the image trunk "
      "with a classifier head on class-labelled data; see the flags under 'classify')")
    a("--model",
      help="open_clip or dtp_ds model name (e.g. ViT-B-32, DRIP-ViT-B-32-10x), or a model JSON path/NAME.json")
    _bool_flag(p, "--grad-checkpointing", "activation checkpointing per transformer block "
               "(default: on iff the ds_config has an activation_checkpointing section)")
    a("--local-loss", action="store_true", help="contrastive loss over local x global features only")
    a("--gather-with-grad", action="store_true", help="gather features across ranks with gradients")
    a("--boundary-loss-weight", type=float,
      help="weight of the token reducer's auxiliary losses (DRIP's boundary-rate loss)")
    a("--compression-schedule", metavar="FILE|SPEC",
      help=COMPRESSION_SCHEDULE_HELP)
    a("--compression-costs", metavar="FILE",
      help="a cost table of tools/compression_costs (JSON): each --compression-schedule segment without a cost "
      "takes its strategy's measured one (whole CLIP step, uncompressed = 1); a strategy the table lacks is refused")
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
    _classify_flags(p.add_argument_group("classify", "--task classify (flag names as timm's train.py)"))
    # defaults are written once, in the dataclasses
    p.set_defaults(**{f.name: f.default for cls in SECTIONS for f in dataclasses.fields(cls)
                      if f.default is not dataclasses.MISSING})
    return p


def _eval_flags(a) -> None:
    """The evaluation's flags (zero-shot for CLIP; --task classify reads the frequency and image cap too)."""
    a("--zeroshot-frequency", type=int, help="zero-shot eval every N epochs and at the end (0: never)")
    a("--zeroshot-data", help="class-folder split with classnames.json and templates.json")
    a("--zeroshot-extra", nargs="+", metavar="DIR",
      help="more class-folder splits evaluated alongside (e.g. data/synth/layout), logged as NAME_top1, ...")
    a("--imagenet-val",
      help="ImageNet-1k val in class-folder layout (open_clip's class names and templates)")
    a("--zeroshot-max-images", type=int, help="evaluate on at most this many images")


def _classify_flags(g: argparse._ArgumentGroup) -> None:
    a = g.add_argument
    a("--num-classes", type=int,
      help="classifier width (default: the class folders of --train-data, else of the first --val-data folder)")
    a("--val-data", nargs="+", metavar="DIR|SHARDS",
      help="validation splits: class-folder trees (ImageFolder layout) or shards with a cls key; top-1/top-5 "
      "every --zeroshot-frequency epochs and at the end, the first logged as val_top1, ..., others as NAME_top1")
    a("--drop-path", type=float, help="stochastic depth rate (default: the model config's trunk_cfg drop_path_rate)")
    a("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment; default: none)")
    a("--reprob", type=float, help="random erasing probability (default 0)")
    a("--color-jitter", type=float, help="colour jitter strength (default 0.4; off under --aa)")
    a("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random-resized-crop area range (default 0.08 1)")
    a("--crop-pct", type=float, help="evaluation centre crop: resize to size / crop-pct, crop (default 0.875)")
    a("--smoothing", type=float, help="label smoothing (default 0.1)")
    a("--mixup", type=float, help="mixup alpha (default 0: off)")
    a("--cutmix", type=float, help="cutmix alpha (default 0: off)")
    a("--mixup-prob", type=float, help="probability of mixing a batch (default 1)")
    a("--mixup-switch-prob", type=float, help="probability of cutmix instead of mixup when both are on (default 0.5)")


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    return from_namespace(build_parser().parse_args(argv))


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """The checked run settings of a :func:`build_parser` namespace (a tool's parser may add flags)."""
    v = vars(ns)

    def take(cls):
        return cls(**{f.name: v[f.name] for f in dataclasses.fields(cls)})

    args = TrainArgs(*(take(cls) for cls in SECTIONS))
    check_args(args)
    return args


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
    check_classify_args(args)


def check_classify_args(args: TrainArgs) -> None:
    c = args.classify
    if args.model.task != "classify":
        def norm(v):  # --scale parses to a list, its default is a tuple
            return list(v) if isinstance(v, tuple | list) else v

        given = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(c)
                 if norm(getattr(c, f.name)) != norm(f.default)]
        if given:
            raise ConfigError(f"{', '.join(given)}: for --task classify (this run is --task {args.model.task})")
        return
    if args.run.zeroshot_data or args.run.imagenet_val or args.run.zeroshot_extra:
        raise ConfigError("--task classify evaluates on --val-data (class folders or cls shards), not zero-shot: "
                          "drop --zeroshot-data / --imagenet-val / --zeroshot-extra")
    if c.num_classes is not None and c.num_classes < 2:
        raise ConfigError(f"--num-classes {c.num_classes}: must be >= 2")
    if not 0.0 <= c.smoothing < 1.0:
        raise ConfigError(f"--smoothing {c.smoothing}: must be in [0, 1)")
    if not 0.0 < c.scale[0] <= c.scale[1] <= 1.0:
        raise ConfigError(f"--scale {c.scale[0]} {c.scale[1]}: need 0 < MIN <= MAX <= 1")
    if c.mixup < 0 or c.cutmix < 0 or not 0 <= c.mixup_prob <= 1 or not 0 <= c.mixup_switch_prob <= 1:
        raise ConfigError("--mixup and --cutmix must be >= 0, --mixup-prob and --mixup-switch-prob in [0, 1]")
    if not 0.0 <= c.reprob <= 1.0 or not 0.0 < c.crop_pct <= 1.0:
        raise ConfigError("--reprob must be in [0, 1], --crop-pct in (0, 1]")
    if c.drop_path is not None and not 0.0 <= c.drop_path < 1.0:
        raise ConfigError(f"--drop-path {c.drop_path}: must be in [0, 1)")
