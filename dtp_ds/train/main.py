"""Training under a DeepSpeed engine (a task of :mod:`dtp_ds.tasks`: CLIP pretraining by default):
the orchestrator.

    deepspeed [--hostfile F | --num_gpus N] --module dtp_ds.train \
        --deepspeed_config ds_configs/vit_b_32.json --model DRIP-ViT-B-32-10x \
        --train-data 'DIR/{00000..00099}.tar' --epochs 10 --lr 5e-4 ...

Everything that can be wrong with the inputs (the output directory's room included) is
checked before anything is written. What can go wrong later is guarded: bad data
(:class:`~dtp_ds.train.guard.BadDataGuard`), non-finite steps
(:class:`~dtp_ds.train.guard.NonFiniteGuard`), a failing or interrupted checkpoint save
(:mod:`dtp_ds.train.checkpoint`); secrets are kept out of what the run writes
(:mod:`dtp_ds.train.redact`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import deepspeed
import numpy as np
import open_clip
import psutil
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

import dtp_ds
from dtp_ds.autotune.memory import PredictedOOM, check_start_memory
from dtp_ds.cluster.process_group import init_process_group
from dtp_ds.data.folder import ClassFolder, class_folder, make_folder_loader
from dtp_ds.data.shards import (
    DataError,
    check_every_worker_has_a_shard,
    count_samples,
    make_train_loader,
    plan_epoch,
    resolve_shards,
)
from dtp_ds.launch.discovery import DiscoveryError, discover
from dtp_ds.launch.probe import git_revision
from dtp_ds.launch.watchdog import EXIT_PEER_LOST, report_failure, start_watchdog, stop_watchdog
from dtp_ds.models import get_model_config, register_model_file, trunks
from dtp_ds.models.registry import renamed_model
from dtp_ds.tasks import TASKS, SplitsContext, TaskSpec, build_task, param_groups, task_type
from dtp_ds.train import checkpoint, init_from
from dtp_ds.train.args import ConfigError, TrainArgs, parse_args
from dtp_ds.train.checkpoint import CheckpointError, TrainState
from dtp_ds.train.ds_config import (
    cpu_has_native_bf16,
    default_ds_config,
    grad_checkpointing_on,
    load_ds_config,
    precision_of,
    resolve,
    resolve_batch,
)
from dtp_ds.train.gradcache import GradCacheStep
from dtp_ds.train.guard import BadDataGuard, NonFiniteGuard, TrainingError
from dtp_ds.train.metrics import MetricsLogger, write_json_atomic
from dtp_ds.train.precision import DTYPES, check_precision_supported
from dtp_ds.train.redact import install_log_filter, one_line, redact
from dtp_ds.train.schedule import Schedules, before_resume, check_resumed_lr, warmup_decay_lr
from dtp_ds.train.seqcomp_schedule import Segment, SeqCompSchedule, load_schedule, with_costs
from dtp_ds.train.storage import check_storage, saves_planned
from dtp_ds.train.trainer import BatchStep, PlainStep, Trainer, TrainerConfig

log = logging.getLogger("dtp_ds.train")
__all__ = ["TrainingError", "main", "train"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_name(args: TrainArgs, micro: int) -> str:
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{stamp}-model_{args.model.model}-b_{micro}-ep_{args.optim.epochs}"


def broadcast(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclasses.dataclass
class Setup:
    """What the checks produce: nothing here has touched the disk."""

    args: TrainArgs
    ds_config: dict[str, Any]
    overrides: list[dict[str, Any]]
    shards: list[str]
    plan: Any
    micro: int  # the engine's micro-batch per rank (a GradCache chunk)
    accum: int  # the engine's gradient_accumulation_steps
    total_steps: int
    run_dir: str
    splits: list[Any]  # the task's evaluation splits
    missing_shards: list[str]
    folder: ClassFolder | None = None  # --train-data as a class-folder tree (else shards)
    resume_from: tuple[str, str] | None = None  # (checkpoint root, tag) that --resume names
    resume_plan: checkpoint.ResumePlan | None = None  # how to load it (universal at another world size)
    seqcomp: list[Segment] | None = None  # --seqcomp-schedule's segments
    init: init_from.InitFrom | None = None  # what --init-from did
    chunks: int = 1  # --accum-freq: GradCache chunks per loader batch (1: none)

    @property
    def loader_batch(self) -> int:
        """Samples per rank in one loader batch: a micro-batch, or a GradCache step's whole batch."""
        return self.micro * self.chunks

    @property
    def loader_accum(self) -> int:
        """Loader batches per optimizer step."""
        return self.accum // self.chunks


def gradcache_on(args: TrainArgs) -> bool:
    """--accum-freq K > 1: the engine's K accumulation steps are the chunks of one contrastive
    batch (GradCache); a ds_config's own accumulation steps stay separate contrastive batches."""
    return (args.optim.accum_freq or 1) > 1


def check_gpu_memory(args: TrainArgs, ds_config: dict[str, Any], overrides: list[dict[str, Any]], micro: int,
                     world: int) -> None:
    """On a GPU, the memory model's predicted peak at this world size must fit: where only the
    full contrastive loss's (contrastive batch)^2 logits do not, --local-loss --gather-with-grad (the
    same gradients) is turned on and recorded; otherwise the run is refused with the fixes."""
    if not torch.cuda.is_available() or not task_type(args.model.task).contrastive_memory:
        return  # (the memory model knows CLIP's towers and contrastive logits, not a classifier's)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    cfg = args.task_config  # a contrastive task's settings have local_loss and gather_with_grad
    try:
        changes, why = check_start_memory(args.model.model, ds_config, micro, world, total, cfg.local_loss,
                                          cfg.gather_with_grad, grad_checkpointing_on(ds_config, args),
                                          gradcache=gradcache_on(args))
    except PredictedOOM as e:
        raise ConfigError(str(e)) from e
    except ValueError as e:  # the memory model has no shape for this model (dtp_ds.autotune.memory.model_shape)
        log.warning("start-up GPU memory check skipped: the memory model cannot predict %s's peak (%s); "
                    "the run starts unchecked", args.model.model, e)
        return
    for key, value in changes.items():
        setattr(cfg, key, value)
        overrides.append({"key": key, "flag": "start-up memory check", "value": value, "why": why})
    if why:
        log.warning("%s", why)


def prepare(args: TrainArgs, world: int, rank: int) -> Setup:
    """Every check that needs no engine: model, data, batch arithmetic, run directory."""
    if args.model.model.endswith(".json"):  # a model JSON of one's own: registered under its file name
        try:
            args.model.model = register_model_file(args.model.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {args.model.model}: {e}") from e
    if args.model.init_from:
        init_from.check_source(args.model.init_from)
    task_cls = task_type(args.model.task)  # (known: parse_args checked it)
    if args.model.model not in open_clip.list_models():
        raise ConfigError(renamed_model(args.model.model) or
                          f"unknown model '{args.model.model}'. dtp_ds models: {', '.join(dtp_ds.list_models())}; "
                          f"or any open_clip name (e.g. ViT-B-32, see open_clip.list_models())")
    if not args.run.deepspeed_config:
        args.run.deepspeed_config = default_ds_config(args.model.model, get_accelerator().is_bf16_supported())
    raw = load_ds_config(args.run.deepspeed_config)
    micro, accum = resolve_batch(raw, args, world)
    folder, shards, missing = None, [], []
    if os.path.isdir(args.data.train_data):
        if "folder" not in task_cls.train_layouts:
            takes = sorted(n for n, c in TASKS.items() if "folder" in c.train_layouts)
            raise ConfigError(f"--train-data {args.data.train_data} is a directory: --task {args.model.task} trains on "
                              f"shards, not a class-folder tree (tasks that take one: {', '.join(takes)}); give shards")
        folder = class_folder(args.data.train_data)
        num_samples = args.data.train_num_samples or len(folder.samples)
    else:
        shards, missing = resolve_shards(args.data.train_data)
        check_every_worker_has_a_shard(args.data, shards, world)
        if len(missing) > args.data.max_bad_fraction * (len(shards) + len(missing)):
            raise ConfigError(f"{len(missing)} of {len(shards) + len(missing)} shards named by --train-data do not "
                              f"exist (first: {missing[0]}), more than --max-bad-fraction "
                              f"{args.data.max_bad_fraction}: fix the directory or the brace range, or raise "
                              f"--max-bad-fraction")
        num_samples = args.data.train_num_samples or count_samples(shards)
    if not num_samples:
        raise ConfigError("the shards carry no *_stats.json sample counts: give --train-num-samples")
    # a GradCache step's chunks come in one loader batch; a task whose loss does not couple the
    # batch accumulates its --accum-freq micro-batches the plain way (exact for it)
    chunks = accum if gradcache_on(args) and task_cls.couples_batch else 1
    plan = plan_epoch(num_samples, micro * chunks, world, args.data.workers, accum // chunks)
    total_steps = plan.batches_per_rank * chunks // accum * args.optim.epochs
    on_cpu = get_accelerator().device_name() == "cpu"
    ds_config, overrides = resolve(raw, args, world, cpu_has_native_bf16() if on_cpu else None)
    check_precision_supported(precision_of(ds_config))
    check_gpu_memory(args, ds_config, overrides, micro, world)
    try:
        ctx = SplitsContext(len(folder.classes) if folder else None, micro, args.data.train_data)
        splits, settled = task_cls.eval_splits(args.task_config, ctx)
    except (ValueError, DataError) as e:
        raise ConfigError(str(e)) from e
    overrides += settled
    seqcomp = None
    if args.model.seqcomp_schedule:
        try:
            seqcomp = load_schedule(args.model.seqcomp_schedule)
            if args.model.seqcomp_costs:
                seqcomp = with_costs(seqcomp, args.model.seqcomp_costs)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from e
    name = args.run.name or broadcast(default_name(args, micro) if rank == 0 else None)
    run_dir = os.path.join(args.run.logs, name)
    if not args.run.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"run directory {run_dir} already exists: pass --resume latest to continue it, "
                          f"or --name to start a new run")
    return Setup(args, ds_config, overrides, shards, plan, micro, accum, total_steps, run_dir, splits, missing,
                 folder=folder, seqcomp=seqcomp, chunks=chunks)


def write_run_config(s: Setup, world: int, resumed_from: str | None) -> None:
    """RUN/config.json: everything that describes the run (secrets redacted)."""
    write_json_atomic(os.path.join(s.run_dir, "config.json"), {
        "args": s.args.to_dict(),
        "ds_config_file": s.args.run.deepspeed_config,
        "ds_config": s.ds_config,
        "overrides": s.overrides,
        "model_cfg": get_model_config(s.args.model.model),
        "world_size": world,
        "epoch_plan": dataclasses.asdict(s.plan),
        "total_steps": s.total_steps,
        "shards": len(s.shards),
        "missing_shards": s.missing_shards,
        "git_revision": git_revision(short=False),
        "versions": {"dtp_ds": dtp_ds.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "open_clip": open_clip.__version__},
        "resumed_from": resumed_from,
        "init_from": s.init.summary() if s.init else None,
        "command": sys.argv,
    })


def _rank_local(batches: Iterator[Any]) -> Iterator[Any]:
    """The loader's batches; a DataError raised in this rank's workers is marked as this
    rank's own (printed by it, not only by rank 0)."""
    try:
        yield from batches
    except DataError as e:
        e.rank_local = True  # type: ignore[attr-defined]
        raise


def build_engine(s: Setup, rank: int, world: int, lr_scheduler: Callable[[Any], Any] | None = None
                 ) -> tuple[Any, Any]:
    """The task (model, loss, data stage, evaluation) and the DeepSpeed engine over its module;
    ``lr_scheduler``: optimizer -> scheduler (default: the run's warmup and decay)."""
    args = s.args
    seed_all(args.run.seed)  # identical initial weights on every rank
    wd = s.ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    spec = TaskSpec(args.model.model, rank, world, DTYPES[precision_of(s.ds_config)], args.model.reducer_loss_weight,
                    args.task_config, weight_decay=wd)
    task = build_task(args.model.task, spec)
    if grad_checkpointing_on(s.ds_config, args):
        task.model.set_grad_checkpointing(True)
    s.resume_from = checkpoint.resolve_resume(args.run.resume, s.run_dir) if args.run.resume else None
    if s.resume_from:  # at another world size: DeepSpeed's universal checkpoint (ZeRO 1/2)
        s.resume_plan = checkpoint.plan_resume(s.resume_from, world, s.ds_config)
        s.ds_config = s.resume_plan.apply(s.ds_config)
    if args.model.init_from:  # before the engine: ZeRO-3 partitions the loaded weights
        s.init = init_from.apply(task.model, args.model.init_from, s.resume_from, rank)
    engine, _, _, _ = deepspeed.initialize(
        model=task.module, model_parameters=param_groups(task.module, wd), config=s.ds_config,
        lr_scheduler=lr_scheduler or (lambda opt: warmup_decay_lr(
            opt, args.optim.warmup, s.total_steps, args.optim.epochs, args.optim.lr_scheduler,
            args.optim.lr_poly_power)))
    return task, engine


def resume(s: Setup, engine, schedules: Schedules, rank: int) -> tuple[TrainState, str | None, float, bool]:
    """Load the checkpoint ``--resume`` names, if any: (state, where from, load seconds, whether
    it is this run's own, whose state is current and not saved again)."""
    args = s.args
    found = s.resume_from
    if args.run.resume and found is None:
        log.warning("--resume %s: no checkpoint in %s yet; starting from scratch", args.run.resume, s.run_dir)
    if found is None:
        seed_all(args.run.seed + 1000 * rank)  # per-rank noise (DRIP boundary sampling, drop path)
        return TrainState(), None, 0.0, False
    t0 = time.time()
    before_resume(engine.lr_scheduler)
    # restores each rank's RNG as it was saved; a rank it has none for gets a stream of its own
    state, client = checkpoint.load(engine, *found, seed=args.run.seed, engine_tag=s.resume_plan.engine_tag)
    try:
        note = check_resumed_lr(engine.lr_scheduler, args.optim.warmup, args.optim.epochs, s.total_steps,
                                args.optim.lr_scheduler, args.optim.lr_poly_power)
        schedules.load_state_dict(client.get("schedules", {}))
    except ValueError as e:
        raise ConfigError(f"--resume {os.path.join(*found)}: {e}") from e
    if note and rank == 0:
        log.warning("--resume: %s", note)
    own = os.path.abspath(found[0]) == os.path.abspath(checkpoint.checkpoint_root(s.run_dir))
    return state, os.path.join(*found), time.time() - t0, own


def open_run_dir(s: Setup, world: int, rank: int, resumed_from: str | None) -> dict[str, list[str]]:
    """Create the run directory, drop incomplete checkpoints of a resumed run (and put the ones
    newer than where it resumed first in line for pruning), write config.json."""
    dropped: dict[str, list[str]] = {"discarded": [], "abandoned": []}
    root = checkpoint.checkpoint_root(s.run_dir)
    if s.args.run.resume:
        dist.barrier()  # every rank has read its checkpoint files: leftovers may go now
    if rank == 0:
        os.makedirs(s.run_dir, exist_ok=True)
        if s.args.run.resume:
            dropped["discarded"] = checkpoint.discard_incomplete(root)
            if s.resume_from and os.path.abspath(s.resume_from[0]) == os.path.abspath(root):
                dropped["abandoned"] = checkpoint.abandon_newer(root, s.resume_from[1])
        write_run_config(s, world, resumed_from)
        if s.init:
            s.init.write(s.run_dir)
    dist.barrier()
    return dropped


def make_logger(s: Setup, rank: int, state: TrainState, resumed_from: str | None) -> MetricsLogger:
    run = s.args.run
    wandb_cfg = None
    if run.report_to == "wandb":
        wandb_cfg = {"project": run.wandb_project_name, "name": os.path.basename(s.run_dir),
                     "dir": s.run_dir, "config": {"args": s.args.to_dict(), "ds_config": s.ds_config},
                     "resume": "allow", "id": os.path.basename(s.run_dir).replace("/", "_")}
    return MetricsLogger(s.run_dir, rank == 0, state.step if resumed_from else None, wandb_cfg)


def make_trainer(s: Setup, task, engine, device: torch.device, rank: int, world: int) -> Trainer:
    """Resume (or seed), open the run directory, and put the Trainer together."""
    args = s.args
    schedules = Schedules(task.schedules(s.total_steps))
    if s.seqcomp:
        try:
            schedules.items["seqcomp"] = SeqCompSchedule(s.seqcomp, trunks(task.module), s.total_steps)
        except ValueError as e:
            raise ConfigError(f"--seqcomp-schedule {args.model.seqcomp_schedule}: {e}") from e
    state, resumed_from, t_load, own = resume(s, engine, schedules, rank)
    last_step = min(s.total_steps, args.optim.max_steps or s.total_steps)
    n_params = sum(p.numel() for p in task.model.parameters())
    check_storage(s.run_dir, s.ds_config, n_params, precision_of(s.ds_config), args.run.keep_checkpoints,
                  saves_planned(state.step, last_step, args.run.save_every_n_steps,
                                s.plan.batches_per_rank // s.loader_accum))
    dropped = open_run_dir(s, world, rank, resumed_from)
    logger = make_logger(s, rank, state, resumed_from)
    if resumed_from:
        logger.log({"step": state.step, "event": "resume", "from": resumed_from, "load_s": t_load,
                    "startup_s": time.time() - psutil.Process().create_time(), **dropped})
    root = checkpoint.checkpoint_root(s.run_dir)
    cfg = TrainerConfig(run_dir=s.run_dir, accum=s.loader_accum, global_batch=s.micro * s.accum * world,
                        last_step=last_step, batches_per_epoch=s.plan.batches_per_rank,
                        log_every=args.run.log_every_n_steps, save_every=args.run.save_every_n_steps,
                        keep_checkpoints=args.run.keep_checkpoints, eval_every_epochs=args.run.eval_frequency,
                        eval_batch_size=2 * s.micro, eval_max_images=args.run.eval_max_images,
                        eval_workers=args.data.workers, views_per_sample=task.views_per_sample,
                        missing_shards=len(s.missing_shards))
    client = {"model_name": args.model.model, "model_cfg": get_model_config(args.model.model),
              "task": args.model.task, "task_state": task.client_state()}
    nonfinite = NonFiniteGuard(engine, precision_of(s.ds_config), args.run.max_nonfinite_steps, rank, root)
    return Trainer(cfg, task, engine, state, logger, nonfinite,
                   BadDataGuard(args.data.max_bad_fraction, s.plan.num_samples), s.splits, client, schedules,
                   device, rank, saved_at=state.step if own else -1,
                   stepper=make_stepper(s, task, engine, nonfinite, device))


def make_stepper(s: Setup, task, engine, nonfinite: NonFiniteGuard, device: torch.device) -> BatchStep:
    """What one loader batch runs: GradCache's chunks under --accum-freq, else one micro-batch."""
    if s.chunks == 1:
        return PlainStep(engine, nonfinite, device)
    try:
        return GradCacheStep(engine, task.module, s.chunks, nonfinite, device)
    except ValueError as e:
        raise ConfigError(f"--accum-freq {s.chunks} (GradCache) with --task {s.args.model.task}: {e}") from e


def start_distributed(args: TrainArgs) -> tuple[int, int, torch.device]:
    """Process group, peer watchdog and this rank's device: (rank, world size, device)."""
    deepspeed.utils.logger.setLevel(logging.WARNING)
    source = discover()  # RANK, WORLD_SIZE, ... from the launcher, MPI or Slurm
    init_process_group(args.run.dist_timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d: process group up (%s; ranks from %s)", rank, world, dist.get_backend(), source)
    start_watchdog(args.run.peer_timeout_seconds)
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.run.local_rank, 0)))
    get_accelerator().set_device(local_rank)
    return rank, world, torch.device(get_accelerator().device_name(local_rank))


def train(args: TrainArgs) -> int:
    rank, world, device = start_distributed(args)
    s = prepare(args, world, rank)
    log.info("checks passed: %d shards, %d batches per rank per epoch, %d steps", len(s.shards),
             s.plan.batches_per_rank, s.total_steps)
    task, engine = build_engine(s, rank, world)
    trainer = make_trainer(s, task, engine, device, rank, world)
    stage = task.data_stage()
    for epoch in range(trainer.state.epoch, args.optim.epochs):
        if trainer.done:
            break
        make_loader = make_folder_loader if s.folder else make_train_loader
        loader = make_loader(args.data, s.folder or s.shards, s.plan, stage, s.loader_batch, epoch, args.run.seed,
                             rank, world, trainer.state.batches_in_epoch)
        with torch.random.fork_rng(devices=[]):  # starting the workers draws from the RNG: not from the run's
            batches = _rank_local(iter(loader))
        t_fetch = time.time()
        for batch in batches:
            trainer.waited_for_data(time.time() - t_fetch)
            if trainer.step(batch):
                break
            t_fetch = time.time()
        trainer.end_epoch(epoch)
    trainer.finish()
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: train(parse_args(argv)))


# what stops a run with one line on stderr (exit 2) instead of a traceback: a refused setting,
# bad data, a failed check or checkpoint, a missing file, ranks that cannot be discovered
REFUSALS = (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError, DiscoveryError)


def refuse(e: BaseException, prog: str = "dtp_ds.train") -> int:
    """One of :data:`REFUSALS` on one rank: its one line on stderr (rank 0's, or this rank's when
    only this rank saw it), published to the peers; the exit status (2)."""
    report_failure(e)  # peers name this rank and its message rather than time out
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or getattr(e, "rank_local", False):
        where = f"rank {rank}: " if rank != 0 else ""
        # tqdm.write: on a line of its own even while the progress bar is drawn
        tqdm.write(redact(f"{prog}: error: {where}{one_line(e)}"), file=sys.stderr)
    return 2


def guarded(body: Callable[[], int], prog: str = "dtp_ds.train") -> int:
    """Run one rank's ``body``: a refused setting or bad data is one line on stderr (exit 2), a
    lost peer is named; the watchdog and the process group are shut down either way."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    try:
        return body()
    except REFUSALS as e:
        return refuse(e, prog)
    except Exception as e:
        if report_failure(e):  # a collective failed because a peer died: named (printed) instead of a traceback
            return EXIT_PEER_LOST
        raise
    finally:
        stop_watchdog()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
