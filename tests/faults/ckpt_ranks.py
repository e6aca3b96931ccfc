"""Run by tests/faults/test_checkpoint_ranks.py under the deepspeed launcher, 2 ranks: a real
ZeRO-2 engine saves through ``checkpoint.save`` with a failure injected in each phase on one
rank, then loads (verification shared out, a rank without RNG state). Each rank writes what it
saw to OUT/rank{r}.json."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import deepspeed
import open_clip
import torch
import torch.distributed as dist

import dtp_ds  # noqa: F401  (registers the dtp_ds models with open_clip)
from dtp_ds.cluster.process_group import init_process_group
from dtp_ds.tasks import param_groups
from dtp_ds.tasks.clip import CLIPModule
from dtp_ds.train import checkpoint, faults
from dtp_ds.train.checkpoint import CheckpointError, TrainState

# (step, phase, failing rank): the commit is rank 0's alone
FAILURES = [(2, "prepare", 1), (3, "deepspeed", 1), (4, "write", 1), (5, "verify", 0), (6, "commit", 0)]


def main(out: str) -> None:
    deepspeed.utils.logger.setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    init_process_group(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    task = CLIPModule(open_clip.create_model("ViT-Tiny-8", output_dict=True, nonscalar_logit_scale=True),
                    rank, 2, input_dtype=torch.bfloat16)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=task, model_parameters=param_groups(task, 0.1), config=cfg)
    g = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=g), "text": torch.randint(1, 1000, (2, 32), generator=g)}
    engine.backward(engine(batch)["loss"])
    engine.step()
    run_dir = os.path.join(out, "run")
    root = checkpoint.checkpoint_root(run_dir)
    client = {"model_name": "ViT-Tiny-8", "schedules": {"warmup": {"step": 3, "curve": [0.5, 1.0]}}}
    seen: dict = {"failures": []}
    checkpoint.save(engine, run_dir, TrainState(step=1), client, keep=2)

    for step, phase, failing in FAILURES:
        os.environ[faults.SAVE_FAIL_ENV] = f"{step}:{phase}@{failing}"
        t0 = time.time()
        try:
            checkpoint.save(engine, run_dir, TrainState(step=step), client, keep=2)
            error = None
        except CheckpointError as e:
            error = str(e)
        dist.barrier()
        seen["failures"].append({"step": step, "phase": phase, "rank": failing, "error": error,
                                 "seconds": time.time() - t0, "latest": checkpoint.latest_tag(root),
                                 "listing": sorted(os.listdir(root))})
    os.environ.pop(faults.SAVE_FAIL_ENV)
    checkpoint.save(engine, run_dir, TrainState(step=7), client, keep=2)
    ckpt = os.path.join(root, "step_00000007")
    seen["verified"] = checkpoint.verify_checkpoint(ckpt)

    # a checkpoint as one rank saves it holds one RNG file: rank 1 has no RNG state in it
    one = os.path.join(root, "one_rng")
    if rank == 0:
        shutil.copytree(ckpt, one)
        os.unlink(os.path.join(one, "rng_rank0001.pt"))
    dist.barrier()
    torch.manual_seed(0)  # what every rank's stream is before a load (main seeds all alike for the weights)
    seen["shared_draw"] = torch.rand(4).tolist()
    torch.manual_seed(0)
    state, loaded = checkpoint.load(engine, root, "one_rng", seed=5)
    seen["draw_after_load"] = torch.rand(4).tolist()
    seen["state_step"], seen["client_schedules"] = state.step, loaded["schedules"]

    # a tampered file in rank 1's share: both ranks refuse, naming it
    bad = os.path.join(root, "tampered")
    if rank == 0:
        shutil.copytree(ckpt, bad)
    dist.barrier()
    target = dist_object(seen["verified"][-1] if rank == 1 else None, src=1).replace(ckpt, bad)
    if rank == 0:
        torch.save({"evil": _Exploit()}, target)
    dist.barrier()
    try:
        checkpoint.verify_checkpoint(bad)
        seen["tampered_error"] = None
    except CheckpointError as e:
        seen["tampered_error"] = str(e)
    seen["tampered_file"] = target
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled",))


def dist_object(obj, src: int):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


if __name__ == "__main__":
    main(sys.argv[-1])  # the launcher puts --local_rank=N first
