"""CLIP pretraining under a DeepSpeed engine: the orchestrator.

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
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
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
from dtp_ds.data.shards import (
    DataError,
    check_every_worker_has_a_shard,
    count_samples,
    make_train_loader,
    plan_epoch,
    resolve_shards,
)
from dtp_ds.eval.zeroshot import (
    ZeroShotSplit,
    check_split,
    folder_split,
    imagenet_split,
    with_prefix,
    zero_shot_eval,
)
from dtp_ds.launch.discovery import DiscoveryError, discover
from dtp_ds.launch.probe import git_revision
from dtp_ds.launch.watchdog import EXIT_PEER_LOST, report_failure, start_watchdog, stop_watchdog
from dtp_ds.models import get_model_config, register_model_file
from dtp_ds.train import checkpoint
from dtp_ds.train.args import ConfigError, TrainArgs, parse_args
from dtp_ds.train.checkpoint import CheckpointError
from dtp_ds.train.ds_config import (
    cpu_has_native_bf16,
    default_ds_config,
    grad_checkpointing_on,
    load_ds_config,
    precision_of,
    resolve,
    resolve_batch,
)
from dtp_ds.train.guard import BadDataGuard, NonFiniteGuard, TrainingError, all_reduce_step
from dtp_ds.train.metrics import (
    MetricsLogger,
    loss_scale,
    param_fingerprints,
    peak_memory_gb,
    plot_loss_curve,
    write_json_atomic,
)
from dtp_ds.train.redact import install_log_filter, redact
from dtp_ds.train.schedule import WarmupCosineLR
from dtp_ds.train.storage import check_storage, saves_planned
from dtp_ds.train.task import CLIPTask, param_groups

log = logging.getLogger("dtp_ds.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["TrainingError", "main", "train"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _folder_split(path: str, flag: str) -> ZeroShotSplit:
    if not os.path.isfile(os.path.join(path, "classnames.json")):
        raise ConfigError(f"{flag} {path}: no classnames.json there "
                          f"(make one with tools/make_synthetic_shards, or use --imagenet-val)")
    return folder_split(path)


def _checked(split: ZeroShotSplit) -> ZeroShotSplit:
    if not os.path.isdir(split.image_dir):
        raise ConfigError(f"zero-shot images: {split.image_dir} is not a directory")
    try:
        check_split(split)
    except ValueError as e:
        raise ConfigError(f"zero-shot split: {e}; give one class name per class folder") from e
    return split


def zeroshot_splits(args: TrainArgs) -> list[ZeroShotSplit]:
    """The evaluation splits: ImageNet or --zeroshot-data first (its rows keep the
    ``zeroshot_`` keys), then each --zeroshot-extra."""
    splits = []
    if args.run.imagenet_val:
        splits.append(imagenet_split(args.run.imagenet_val))
    elif args.run.zeroshot_data:
        splits.append(_folder_split(args.run.zeroshot_data, "--zeroshot-data"))
    splits += [_folder_split(d, "--zeroshot-extra") for d in args.run.zeroshot_extra or []]
    return [_checked(s) for s in splits]


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
    micro: int
    accum: int
    total_steps: int
    run_dir: str
    splits: list[ZeroShotSplit]
    missing_shards: list[str]


EMULATED_FP16_ENV = "DTP_DS_ALLOW_EMULATED_FP16"


def check_precision_supported(precision: str) -> None:
    """DeepSpeed refuses fp16 on CPUs without native fp16 (AVX512-FP16 / AMX-FP16) with a
    bare message; say what to do instead. The env switch lifts only that capability gate:
    the real fp16 engine and its dynamic loss scaler then run with emulated fp16 kernels
    (slow; how the CPU test suite covers fp16)."""
    acc = get_accelerator()
    if precision == "bf16" and not acc.is_bf16_supported():
        raise ConfigError(f"bf16 (from --precision or the ds_config) is not supported on this {acc.device_name()} "
                          f"device (a V100 has none): use the config's fp16 variant (ds_configs/*_fp16.json) "
                          f"or --precision fp16")
    if precision != "fp16" or acc.is_fp16_supported():
        return
    if os.environ.get(EMULATED_FP16_ENV) == "1":
        acc.is_fp16_supported = lambda: True
        return
    raise ConfigError(f"fp16 (from --precision or the ds_config) is not supported on this {acc.device_name()} "
                      f"device: use bf16 or fp32 here and fp16 on GPUs without bf16 (V100), or set "
                      f"{EMULATED_FP16_ENV}=1 to run it emulated (slow)")


def prepare(args: TrainArgs, world: int, rank: int) -> Setup:
    """Every check that needs no engine: model, data, batch arithmetic, run directory."""
    if args.model.model.endswith(".json"):  # a model JSON of one's own: registered under its file name
        try:
            args.model.model = register_model_file(args.model.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {args.model.model}: {e}") from e
    if args.model.model not in open_clip.list_models():
        raise ConfigError(f"unknown model '{args.model.model}'. dtp_ds models: {', '.join(dtp_ds.list_models())}; "
                          f"or any open_clip name (e.g. ViT-B-32, see open_clip.list_models())")
    if not args.run.deepspeed_config:
        args.run.deepspeed_config = default_ds_config(args.model.model, get_accelerator().is_bf16_supported())
    raw = load_ds_config(args.run.deepspeed_config)
    micro, accum = resolve_batch(raw, args, world)
    shards, missing = resolve_shards(args.data.train_data)
    check_every_worker_has_a_shard(args.data, shards, world)
    if len(missing) > args.data.max_bad_fraction * (len(shards) + len(missing)):
        raise ConfigError(f"{len(missing)} of {len(shards) + len(missing)} shards named by --train-data do not exist "
                          f"(first: {missing[0]}), more than --max-bad-fraction {args.data.max_bad_fraction}: "
                          f"fix the directory or the brace range, or raise --max-bad-fraction")
    num_samples = args.data.train_num_samples or count_samples(shards)
    if not num_samples:
        raise ConfigError("the shards carry no *_stats.json sample counts: give --train-num-samples")
    plan = plan_epoch(num_samples, micro, world, args.data.workers, accum)
    total_steps = plan.batches_per_rank // accum * args.optim.epochs
    on_cpu = get_accelerator().device_name() == "cpu"
    ds_config, overrides = resolve(raw, args, world, cpu_has_native_bf16() if on_cpu else None)
    check_precision_supported(precision_of(ds_config))
    splits = zeroshot_splits(args)
    name = args.run.name or broadcast(default_name(args, micro) if rank == 0 else None)
    run_dir = os.path.join(args.run.logs, name)
    if not args.run.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"run directory {run_dir} already exists: pass --resume latest to continue it, "
                          f"or --name to start a new run")
    return Setup(args, ds_config, overrides, shards, plan, micro, accum, total_steps, run_dir, splits, missing)


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
        "command": sys.argv,
    })


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def _rank_local(batches: Iterator[Any]) -> Iterator[Any]:
    """The loader's batches; a DataError raised in this rank's workers is marked as this
    rank's own (printed by it, not only by rank 0)."""
    try:
        yield from batches
    except DataError as e:
        e.rank_local = True  # type: ignore[attr-defined]
        raise


def _step(engine) -> None:
    try:
        engine.step()
    except Exception as e:  # DeepSpeed's dynamic loss scaler gives up with a bare Exception
        if "loss scale already at minimum" in str(e):
            raise TrainingError("fp16: the dynamic loss scale reached its minimum and the gradients still "
                                "overflow: lower --lr, set --grad-clip-norm, or train in bf16") from e
        raise


def train(args: TrainArgs) -> int:
    deepspeed.utils.logger.setLevel(logging.WARNING)
    source = discover()  # RANK, WORLD_SIZE, ... from the launcher, MPI or Slurm
    deepspeed.init_distributed(auto_mpi_discovery=True, timeout=timedelta(minutes=args.run.dist_timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d: process group up (%s; ranks from %s)", rank, world, dist.get_backend(), source)
    start_watchdog(args.run.peer_timeout_seconds)
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.run.local_rank, 0)))
    get_accelerator().set_device(local_rank)
    device = torch.device(get_accelerator().device_name(local_rank))
    s = prepare(args, world, rank)
    precision = precision_of(s.ds_config)
    log.info("checks passed: %d shards, %d micro-batches per rank per epoch, %d steps", len(s.shards),
             s.plan.batches_per_rank, s.total_steps)
    input_dtype = DTYPES[precision]

    seed_all(args.run.seed)  # identical initial weights on every rank
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        args.model.model, output_dict=True, nonscalar_logit_scale=True)  # 0-dim params break DeepSpeed broadcasts
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = open_clip.get_tokenizer(args.model.model)
    if grad_checkpointing_on(s.ds_config, args):
        model.set_grad_checkpointing(True)
    task = CLIPTask(model, rank, world, args.model.local_loss, args.model.gather_with_grad,
                    args.model.boundary_loss_weight, input_dtype)
    wd = s.ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=task, model_parameters=param_groups(task, wd), config=s.ds_config,
        lr_scheduler=lambda opt: WarmupCosineLR(opt, max(1, args.optim.warmup), s.total_steps))

    state, resumed_from = checkpoint.TrainState(), None
    root = checkpoint.checkpoint_root(s.run_dir)
    found = checkpoint.resolve_resume(args.run.resume, s.run_dir) if args.run.resume else None
    if args.run.resume and found is None:
        log.warning("--resume %s: no checkpoint in %s yet; starting from scratch", args.run.resume, s.run_dir)
    t_load = time.time()
    if found is None:
        seed_all(args.run.seed + 1000 * rank)  # per-rank noise (DRIP boundary sampling)
    else:
        state, _ = checkpoint.load(engine, *found)  # restores each rank's RNG as it was saved
        resumed_from = os.path.join(*found)
    t_load = time.time() - t_load
    last_step = min(s.total_steps, args.optim.max_steps or s.total_steps)
    check_storage(s.run_dir, s.ds_config, n_params, precision, s.args.run.keep_checkpoints,
                  saves_planned(state.step, last_step, args.run.save_every_n_steps, s.plan.batches_per_rank // s.accum))

    discarded = []
    if args.run.resume:
        dist.barrier()  # every rank has read its checkpoint files: leftovers may go now
    if rank == 0:
        os.makedirs(s.run_dir, exist_ok=True)
        if args.run.resume:
            discarded = checkpoint.discard_incomplete(root)
        write_run_config(s, world, resumed_from)
    dist.barrier()
    wandb_cfg = None
    if args.run.report_to == "wandb":
        wandb_cfg = {"project": args.run.wandb_project_name, "name": os.path.basename(s.run_dir),
                     "dir": s.run_dir, "config": {"args": s.args.to_dict(), "ds_config": s.ds_config},
                     "resume": "allow", "id": os.path.basename(s.run_dir).replace("/", "_")}
    logger = MetricsLogger(s.run_dir, rank == 0, state.step if resumed_from else None, wandb_cfg)
    if resumed_from:
        logger.log({"step": state.step, "event": "resume", "from": resumed_from, "load_s": t_load,
                    "startup_s": time.time() - psutil.Process().create_time(), "discarded": discarded})

    client = {"model_name": args.model.model, "model_cfg": get_model_config(args.model.model)}
    global_batch = s.micro * s.accum * world
    nonfinite = NonFiniteGuard(engine, precision, args.run.max_nonfinite_steps, rank, root)
    bad_data = BadDataGuard(args.data.max_bad_fraction, s.plan.num_samples)
    bar = tqdm(total=last_step, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    # a checkpoint of this run that it resumed from is its current state: not written again
    resumed_own = found is not None and os.path.abspath(found[0]) == os.path.abspath(root)
    saved_at, evaluated_at = (state.step if resumed_own else -1), -1

    def save() -> None:
        nonlocal saved_at
        nonfinite.check_params(state.step)  # never commit broken weights
        checkpoint.save(engine, s.run_dir, state, client, args.run.keep_checkpoints)
        saved_at = state.step

    def evaluate() -> None:
        nonlocal evaluated_at
        if not s.splits or args.run.zeroshot_frequency == 0:
            return
        t0 = time.time()
        res: dict[str, Any] = {}
        for i, split in enumerate(s.splits):
            one = zero_shot_eval(engine.module.model, tokenizer, preprocess_val, split, device, input_dtype,
                                 batch_size=2 * s.micro, max_images=args.run.zeroshot_max_images,
                                 workers=args.data.workers)
            prefix = "zeroshot_" if i == 0 else f"{split.name}_"
            res.update(with_prefix(one, prefix))
            if rank == 0:
                bar.write(f"zero-shot {split.name} @ step {state.step}: top-1 {one['zeroshot_top1']:.2f}% "
                          f"top-5 {one['zeroshot_top5']:.2f}% (chance {one['zeroshot_chance_top1']:.2f}%)"
                          + (f", eval compression {one['zeroshot_compression']:.2f} (training "
                             f"{last_train['compression']:.2f}), purity {one.get('zeroshot_purity', 0):.3f} "
                             f"(even {one.get('zeroshot_purity_even', 0):.3f}), p spread "
                             f"{one['zeroshot_prob_spread']:.3f}"
                             if "zeroshot_compression" in one and "compression" in last_train else ""))
        if "compression" in last_train:  # the last logged training compression, next to evaluation's
            res["train_compression"] = last_train["compression"]
        res.update(step=state.step, epoch=state.epoch, eval_time=time.time() - t0, split=s.splits[0].name)
        logger.log(res)
        evaluated_at = state.step

    sums: dict[str, torch.Tensor | float] = {}
    last_train: dict[str, float] = {}  # the step means of the last step
    t_step, t_data = time.time(), 0.0
    done = state.step >= last_step
    for epoch in range(state.epoch, args.optim.epochs):
        if done:
            break
        loader = make_train_loader(args.data, s.shards, s.plan, preprocess_train, tokenizer, s.micro, epoch,
                                   args.run.seed, rank, world, state.batches_in_epoch)
        with torch.random.fork_rng(devices=[]):  # starting the workers draws from the RNG: not from the run's
            batches = _rank_local(iter(loader))
        t_fetch = time.time()
        for images, texts, bad in batches:
            t_data += time.time() - t_fetch
            bad_data.add(bad)
            out = engine(images.to(device, non_blocking=True), texts.to(device, non_blocking=True))
            out["loss"] = nonfinite.loss(out["loss"], state.step + 1)
            engine.backward(nonfinite.backward_loss(out["loss"]))
            boundary = engine.is_gradient_accumulation_boundary()
            lr = current_lr(engine)
            _step(engine)
            for k, v in out.items():  # summed on the device: no host synchronisation per micro-batch
                sums[k] = sums.get(k, 0.0) + v.detach().double().reshape(())
            state.batches_in_epoch += 1
            if boundary:
                state.step += 1
                step_time = time.time() - t_step
                # one small collective per step: rank-mean losses and the bad-data counts
                means, bad_counts = all_reduce_step(sums, s.accum, bad_data.take(), device)
                sums = {}
                last_train.update({k: float(v) for k, v in means.items() if k == "compression"})
                state.samples_seen += global_batch
                bad_data.account(state, bad_counts)
                state.nonfinite_steps += nonfinite.account(state.step, means["loss"])
                if state.step % args.run.log_every_n_steps == 0 or state.step in (1, last_step) \
                        or nonfinite.in_a_row:
                    rec = {"step": state.step, "epoch": epoch, **means, "lr": lr,
                           "grad_norm": nonfinite.grad_norm(), "skipped_steps": engine.skipped_steps,
                           "nonfinite_steps": state.nonfinite_steps, "samples_per_s": global_batch / step_time,
                           "step_time": step_time, "data_time": t_data, "peak_mem_gb": peak_memory_gb(),
                           "samples_seen": state.samples_seen, "bad_samples": state.bad_samples,
                           "bad_by_kind": dict(state.bad_by_kind), "missing_shards": len(s.missing_shards)}
                    scale = loss_scale(engine)
                    if scale is not None:
                        rec["loss_scale"] = scale
                    rec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
                    logger.log(rec)
                    bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2e}")
                bad_data.check(state)
                nonfinite.check(state.step)
                bar.update(1)
                if args.run.save_every_n_steps and state.step % args.run.save_every_n_steps == 0:
                    save()
                t_step, t_data = time.time(), 0.0
                if state.step >= last_step:
                    done = True
                    break
            t_fetch = time.time()
        if state.batches_in_epoch >= s.plan.batches_per_rank:  # the epoch ran to its end
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            save()
            if args.run.zeroshot_frequency and state.epoch % args.run.zeroshot_frequency == 0:
                evaluate()
    bar.close()
    if saved_at != state.step:
        save()
    if evaluated_at != state.step:
        evaluate()
    prints = param_fingerprints(engine, device)
    logger.log({"step": state.step, "final": True, "param_fingerprint_by_rank": prints,
                "params_finite": all(math.isfinite(v) for row in prints for v in row),
                "samples_seen": state.samples_seen, "bad_samples": state.bad_samples,
                "bad_by_kind": dict(state.bad_by_kind), "nonfinite_steps": state.nonfinite_steps})
    if rank == 0:
        plot_loss_curve(logger.path, os.path.join(s.run_dir, "loss.png"))
    logger.close()
    dist.barrier()
    return 0


def _one_line(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a dataloader worker (whose message
    is a traceback), the original exception's own message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    try:
        return train(parse_args(argv))
    except (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError, DiscoveryError) as e:
        report_failure(e)  # peers name this rank and its message rather than time out
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or getattr(e, "rank_local", False):
            where = f"rank {rank}: " if rank != 0 else ""
            # tqdm.write: on a line of its own even while the progress bar is drawn
            tqdm.write(redact(f"dtp_ds.train: error: {where}{_one_line(e)}"), file=sys.stderr)
        return 2
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
