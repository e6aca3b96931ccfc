"""The batch-size tuner behind ``tools/autotune_batch``.

For every candidate (precision the GPU supports x ZeRO stage 0-3 x offload x activation
checkpointing) the memory model predicts the peak and the largest micro-batch that fits under
the safety margin; a coarse speed model (FLOPs at a saturating utilisation, exposed
communication, CPU Adam for offload) ranks those that fit. Contrastive learning makes gradient
accumulation different from a larger batch (negatives come only from the micro-batch across
ranks), so a candidate that reaches ``--global-batch`` without accumulation beats a faster one
that needs it, unless ``--allow-accumulation``. Where a setup needs accumulation, its GradCache
variant (``--accum-freq``: the chunks form one contrastive batch, exactly, for one more forward;
the memory model counts the cached features and the whole batch's logits) competes with the
candidates that need none, on speed. The winner becomes a complete ds_config and a launch line.
``--setting amp-ddp`` predicts for the users' open_clip trainer instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from dtp_ds.autotune.memory import (
    Estimate,
    GiB,
    ModelShape,
    TrainSetup,
    estimate,
    max_micro_batch,
    model_shape,
    setup_from_ds_config,
)
from dtp_ds.cluster.partitions import GpuType, JobShapeError, NodeType, Partition, check_job_shape, resolve_target
from dtp_ds.eval.run_metrics import boundary_rate_arg

SAFETY_MARGIN = 0.10
TUNED_BUCKET = int(5e7)  # reduce/allgather buckets in written configs: 100 MB in 16 bits, not DeepSpeed's 1 GB
MFU_MAX, MFU_HALF_TOKENS = 0.45, 4096  # utilisation saturates with tokens per micro-batch (speed ranking only)
CPU_ADAM_PARAMS_PER_S_PER_CORE = 5e7  # DeepSpeedCPUAdam (ZeRO-Offload paper: ~1 B params in ~0.4 s on 48 cores)
PCIE_GBPS = 12.0
HOST_RAM_FRACTION = 0.9


@dataclass
class Job:
    """Where the run goes: the partition's usable node types for this shape."""

    partition: Partition
    nodes: int
    gpus_per_node: int
    node_types: list[NodeType]

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu(self) -> GpuType:
        """The smallest GPU the job can land on: tune for the worst case."""
        return min((n.gpu for n in self.node_types), key=lambda g: g.mem_gib)

    @property
    def gpu_types(self) -> list[GpuType]:
        seen: dict[str, GpuType] = {}
        for n in self.node_types:
            seen.setdefault(n.gpu.name, n.gpu)
        return sorted(seen.values(), key=lambda g: g.mem_gib)

    @property
    def cores_per_gpu(self) -> int:
        """A GPU's fair share of its node's cores (Slurm hands out cores with the GPUs)."""
        return min(n.cores // n.gpus for n in self.node_types)

    @property
    def ram_per_node_gib(self) -> float:
        return min(n.ram_gib for n in self.node_types)

    @property
    def link_gbps(self) -> float:
        if self.nodes > 1:
            return self.partition.inter_node_gbps or 12.0
        return min(n.interconnect_gbps for n in self.node_types)


@dataclass
class Candidate:
    setup: TrainSetup
    max_micro: int = 0  # under the safety margin
    micro: int = 0
    accum: int = 1
    est: Estimate | None = None
    step_time: float | None = None
    reason: str | None = None  # why it cannot be used

    @property
    def usable(self) -> bool:
        return self.reason is None and self.micro > 0

    @property
    def contrastive_splits(self) -> int:
        """Separate contrastive batches per optimizer step (GradCache: one)."""
        return 1 if self.setup.gradcache else self.accum

    def label(self) -> str:
        s = self.setup
        return (f"{s.precision} zero{s.stage}{'' if s.offload == 'none' else '+offload-' + s.offload.replace('+', '-')}"
                f"{' ckpt' if s.ckpt else ''}{' local-loss' if s.local_loss else ''}"
                f"{' gradcache' if s.gradcache else ''}")


# --- speed model (ranking only) ----------------------------------------------------------------
def forward_flops(shape: ModelShape) -> float:
    """Forward FLOPs of one sample (2 per multiply-add), both towers, attention included."""
    def blocks(w: int, mlp: int, rows: float, attn_len: float, n: int) -> float:
        return n * (2 * rows * (4 * w * w + 2 * w * mlp) + 4 * attn_len * attn_len * w)

    v, t = shape.image, shape.text
    patches, full = shape.patches, shape.patches + 1
    total = 2 * patches * 3 * shape.patch_size**2 * v.width
    if shape.trunk is None:
        total += blocks(v.width, v.mlp, full, full, v.layers)
    else:  # per block: token-wise layers on the real tokens, attention on the padded layout
        plan = shape.trunk.plan
        total += sum(blocks(v.width, v.mlp, rows, pad or rows, 1) for rows, pad in zip(plan.tokens, plan.padded))
    return total + blocks(t.width, t.mlp, t.tokens, t.tokens, t.layers)


def step_time(shape: ModelShape, s: TrainSetup, micro: int, accum: int, job: Job) -> float:
    """Seconds per optimizer step per rank (a coarse model: it ranks candidates, it is no benchmark).
    GradCache runs every chunk forward once more (without gradients; its loss over the cached
    features is small beside the towers and left out)."""
    gpu = job.gpu
    peak = (gpu.tflops_fp32 if s.precision == "fp32" else gpu.tflops_16bit) * 1e12
    tokens = micro * (shape.image.tokens + shape.text.tokens)
    mfu = MFU_MAX * tokens / (tokens + MFU_HALF_TOKENS)
    passes = (4 if s.ckpt else 3) + (1 if s.gradcache else 0)  # forwards, backward = 2
    compute = accum * micro * forward_flops(shape) * passes / (peak * mfu)
    lp = 4 if s.precision == "fp32" else 2
    P, W = shape.params, job.world
    comm = 0.0
    if W > 1:
        ring = lp * P * (W - 1) / W / (job.link_gbps * 1e9)
        if s.stage <= 1:
            comm = 2 * ring  # one all-reduce at the boundary, after backward
        elif s.stage == 2:
            comm = 0.5 * ring * (accum + 1)  # reduce-scatter each micro-step (half hidden) + all-gather
        else:
            comm = 0.5 * (4 if s.gradcache else 3) * ring * accum  # gather in each forward and backward, reduce-scatter
    if s.offload == "none":
        opt = 32 * P / W / (gpu.hbm_gbps * 1e9)
    else:
        opt = P / W / (CPU_ADAM_PARAMS_PER_S_PER_CORE * max(1, job.cores_per_gpu)) + 6 * P / W / (PCIE_GBPS * 1e9)
        if s.offload == "optimizer+param":
            opt += accum * (3 if s.gradcache else 2) * lp * P / W / (PCIE_GBPS * 1e9)
    if s.stage == 3:  # parameter gathering and partitioning hooks around every module
        compute *= 1.05
    return compute + comm + opt


# --- search ----------------------------------------------------------------------------------
def precisions_for(gpu: GpuType, requested: str | None) -> list[str]:
    if requested:
        if requested == "bf16" and not gpu.bf16:
            raise ValueError(f"{gpu.name} has no bf16: use --precision fp16 (dynamic loss scaling) or fp32")
        return [requested]
    return ["bf16"] if gpu.bf16 else ["fp16"]


def candidate_setups(precisions: list[str], world: int) -> list[TrainSetup]:
    out = []
    for p in precisions:
        for stage in range(4):
            offloads = ["none"] + (["optimizer"] if stage else []) + (["optimizer+param"] if stage == 3 else [])
            for off in offloads:
                for ckpt in (False, True):
                    out.append(TrainSetup(precision=p, stage=stage, offload=off, ckpt=ckpt, world=world,
                                          reduce_bucket_size=TUNED_BUCKET))
    return out


def _nice(m: int) -> int:
    """A micro-batch to write down: a multiple of 8 from 16 up (tensor-core friendly shapes)."""
    return m if m < 16 else m - m % 8


def evaluate(shape: ModelShape, setup: TrainSetup, job: Job, budget: float, target: int | None,
             local_loss: str) -> Candidate:
    """Fit one candidate: max micro-batch, the micro-batch and accumulation it would use."""
    options = [False, True] if (local_loss == "auto" and job.world > 1) else [local_loss == "on"]
    best: Candidate | None = None
    for ll in options:
        su = replace(setup, local_loss=ll)
        c = Candidate(su, max_micro_batch(shape, su, budget))
        if best is None or (target and c.max_micro >= target > best.max_micro) or \
                (not target and c.max_micro > 1.05 * best.max_micro):
            best = c
    assert best is not None
    c = best
    if c.max_micro == 0:
        c.reason = "model states alone exceed the budget"
        return c
    if target and target > c.max_micro:  # accumulating keeps the gradients through the forwards: less room
        c.max_micro = max_micro_batch(shape, replace(c.setup, accum=2), budget)
        if c.max_micro == 0:
            c.reason = "model states and accumulated gradients alone exceed the budget"
            return c
    if target:
        accum = next((a for a in range(1, target + 1) if target % a == 0 and target // a <= c.max_micro), target)
        c.micro, c.accum = target // accum, accum
    else:
        c.micro = _nice(c.max_micro)
    c.setup = replace(c.setup, accum=c.accum)
    return _priced(shape, c, job)


def _priced(shape: ModelShape, c: Candidate, job: Job) -> Candidate:
    """The candidate's peak at its micro-batch, the host RAM check and its step time."""
    c.est = estimate(shape, c.setup, c.micro)
    host_need = c.est.cpu_per_process * job.gpus_per_node
    if host_need > HOST_RAM_FRACTION * job.ram_per_node_gib * GiB:
        c.reason = f"host RAM: offloaded states need {host_need / GiB:.0f} GiB per node"
        return c
    c.step_time = step_time(shape, c.setup, c.micro, c.accum, job)
    return c


def gradcache_variant(shape: ModelShape, c: Candidate, job: Job, budget: float, target: int | None,
                      local_loss: str) -> Candidate | None:
    """Where candidate ``c`` reaches the per-GPU ``target`` only by accumulating, the same setup
    under GradCache: the fewest chunks whose micro-batch, cached features and whole-batch
    logits fit (None when none do)."""
    if not target or not c.usable or c.accum == 1:
        return None
    options = [False, True] if (local_loss == "auto" and job.world > 1) else [local_loss == "on"]
    for chunks in (a for a in range(2, target + 1) if target % a == 0):
        for ll in options:
            su = replace(c.setup, accum=chunks, gradcache=True, local_loss=ll)
            if estimate(shape, su, target // chunks).peak <= budget:
                gc = Candidate(su, max_micro_batch(shape, su, budget), target // chunks, chunks)
                return _priced(shape, gc, job)
    return None


def rank(cands: list[Candidate], allow_accumulation: bool, shape: ModelShape | None = None) -> list[Candidate]:
    """Usable first; fewest separate contrastive batches per step (unless accumulation is
    allowed; a GradCache step is one); then speed. Candidates within
    1% of the fastest count as equally fast (at one GPU ZeRO 0-2 are): among those the one
    whose memory shrinks most when the job grows to 8x its GPUs comes first, so a config tuned
    for a small job stays good for a large one."""
    usable = [c for c in cands if c.usable]
    rest = [c for c in cands if not c.usable]

    def per_sample(c: Candidate) -> float:
        return c.step_time / (c.micro * c.accum)  # type: ignore[operator]

    def scaled_peak(c: Candidate) -> float:
        if shape is None:
            return 0.0
        return estimate(shape, replace(c.setup, world=8 * c.setup.world), c.micro).peak

    ordered: list[Candidate] = []
    def group(c: Candidate) -> int:
        return 0 if allow_accumulation else c.contrastive_splits

    for g in sorted({group(c) for c in usable}):
        grp = sorted((c for c in usable if group(c) == g), key=per_sample)
        fastest = per_sample(grp[0])
        near = [c for c in grp if per_sample(c) <= 1.01 * fastest]
        near.sort(key=lambda c: (scaled_peak(c), c.est.peak if c.est else 0.0))
        ordered += near + [c for c in grp if c not in near]
    return ordered + rest


# --- outputs ---------------------------------------------------------------------------------
def fp16_section() -> dict[str, Any]:
    # loss_scale 0: dynamic loss scaling, starting at 2^16, halving on overflow.
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
            "hysteresis": 2, "min_loss_scale": 1}


def build_ds_config(c: Candidate, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete DeepSpeed config for one candidate (optimizer: open_clip's AdamW defaults)."""
    from dtp_ds.train.ds_config import DEFAULT_OPTIMIZER

    s = c.setup
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": c.micro, "gradient_accumulation_steps": c.accum,
                           "gradient_clipping": 1.0}
    if s.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif s.precision == "fp16":
        cfg["fp16"] = fp16_section()
    zero: dict[str, Any] = {"stage": s.stage}
    if s.stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=s.stage == 3, reduce_bucket_size=s.reduce_bucket_size)
    if s.stage in (1, 2):
        zero["allgather_bucket_size"] = s.reduce_bucket_size
    if s.stage == 3:
        zero.update(stage3_prefetch_bucket_size=s.prefetch_bucket_size, stage3_param_persistence_threshold=int(1e5))
    if s.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload == "optimizer+param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    if s.ckpt:  # dtp_ds turns per-block checkpointing on when this section exists
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False}
    opt = copy.deepcopy(DEFAULT_OPTIMIZER)
    if s.offload != "none":  # ZeRO-Offload wants DeepSpeedCPUAdam (torch's AdamW on the CPU is refused)
        opt["params"]["torch_adam"] = False
        del opt["params"]["fused"]  # a torch.optim flag
    cfg["optimizer"] = opt
    if meta:
        cfg["_tuned_by"] = meta
    return cfg


def launch_line(model: str, job: Job, out: str, c: Candidate, workers: int) -> str:
    extra = " --local-loss --gather-with-grad" if c.setup.local_loss else ""
    if c.setup.gradcache:
        extra += f" --accum-freq {c.accum}"
    head = (f"deepspeed --num_gpus {job.gpus_per_node}" if job.nodes == 1 else
            f"deepspeed --hostfile HOSTFILE --num_nodes {job.nodes} --num_gpus {job.gpus_per_node}")
    # over pdsh each node's shell sees the command again: quote the shard pattern once more
    data = "'DATA/{00000..NNNNN}.tar'" if job.nodes == 1 else "\"'DATA/{00000..NNNNN}.tar'\""
    return (f"{head} --module dtp_ds.train --deepspeed_config {out} --model {model} "
            f"--train-data {data} --workers {workers}{extra}")


def workers_for(job: Job, c: Candidate | None) -> int:
    """Dataloader workers per rank from the node's cores: one core for the rank itself, and
    half of the rest for CPU Adam when the optimizer is offloaded."""
    spare = max(1, job.cores_per_gpu - 1)
    if c is not None and c.setup.offload != "none":
        spare = max(1, spare // 2)
    return min(spare, 16)


# --- the command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotune_batch",
        description="Largest micro-batch and fastest DeepSpeed setup for a CLIP model on a cluster partition, "
                    "from a memory model of CLIP training (no GPU needed); --probe checks it with real training "
                    "steps on this machine: on a GPU under torch.cuda.set_per_process_memory_fraction, on a CPU "
                    "(no GPU) under an RLIMIT_AS address-space cap, which emulates the budget in host memory "
                    "(the output says which mode ran).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="open_clip or dtp_ds model name (ViT-L-14, DRIP-ViT-L-14-10x, ...)")
    a("--partition", help="CLUSTER:PARTITION (e.g. pitzer:gpuserial, ascend:quad), 'local', or a GPU memory size "
                          "such as 80GB")
    a("--gpu-mem", type=float, help="GPU memory in GB (GiB), instead of --partition")
    a("--nodes", type=int, default=1)
    a("--gpus-per-node", type=int, default=1)
    a("--global-batch", type=int, help="samples per optimizer step over all ranks (default: the largest that fits)")
    a("--image-size", type=int, help="image side in pixels (default: the model's)")
    a("--context-length", type=int, help="text tokens (default: the model's)")
    a("--boundary-rate", help="token reducers with a rate (DRIP: its boundary rate): plan for this rate (default "
      "the configured one, DRIP: 1/compression), or a run directory / "
                              "metrics.jsonl whose logged boundary_rate to use (what a checkpoint learned)")
    a("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 where the GPU has it, else fp16")
    a("--local-loss", choices=["auto", "on", "off"], default="auto",
      help="open_clip's --local-loss --gather-with-grad (B x G logits instead of G x G); auto: when it fits more")
    a("--allow-accumulation", action="store_true",
      help="rank by speed alone (accumulated micro-batches are separate contrastive batches)")
    a("--margin", type=float, default=SAFETY_MARGIN, help="safety margin: fraction of GPU memory left free")
    a("--setting", choices=["deepspeed", "amp-ddp"], default="deepspeed",
      help="amp-ddp: predict for open_clip's trainer (AMP fp16, DDP, no checkpointing) instead of searching")
    a("--micro-batch", type=int, nargs="*", default=[],
      help="also report the predicted peak at these micro-batches (with --setting amp-ddp: fit or OOM)")
    a("--probe", action="store_true", help="check with real training steps on this machine (binary search)")
    a("--memory-budget", type=float, help="probe budget in GB (default: the target GPU's memory)")
    a("--probe-cap", type=int, help="largest micro-batch the probe tries (default: 4 x the prediction)")
    a("--out", help="write the ds_config here")
    a("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def canonical_command(args: argparse.Namespace) -> str:
    parts = ["tools/autotune_batch", "--model", args.model]
    parts += ["--partition", args.partition] if args.partition else ["--gpu-mem", f"{args.gpu_mem:g}"]
    parts += ["--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node)]
    for flag in ("global_batch", "image_size", "context_length", "boundary_rate", "precision"):
        v = getattr(args, flag)
        if v is not None:
            parts += ["--" + flag.replace("_", "-"), str(v)]
    if args.local_loss != "auto":
        parts += ["--local-loss", args.local_loss]
    if args.allow_accumulation:
        parts.append("--allow-accumulation")
    if args.margin != SAFETY_MARGIN:
        parts += ["--margin", f"{args.margin:g}"]
    return shlex.join(parts)


@dataclass
class Report:
    data: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def _gib(x: float) -> float:
    return round(x / GiB, 2)


def run_amp_ddp(args: argparse.Namespace, shape: ModelShape, job: Job) -> Report:
    """Predict open_clip's trainer (AMP fp16 autocast, DDP when world > 1, no checkpointing):
    the OOM boundary on every GPU type of the partition (no margin: fit or OOM)."""
    su = TrainSetup(setting="amp-ddp", precision="fp16", world=job.world, local_loss=args.local_loss == "on")
    by_type, lines = {}, []
    for gpu in job.gpu_types:
        mem = gpu.mem_gib * GiB
        mx = max_micro_batch(shape, su, mem)
        checks = []
        for m in args.micro_batch:
            e = estimate(shape, su, m)
            checks.append({"micro_batch": m, "peak_memory_gb": _gib(e.peak), "fits": e.peak <= mem,
                           "phase": e.phase, "breakdown_gb": e.table()})
        by_type[gpu.name] = {"gpu_mem_gb": gpu.mem_gib, "max_micro_batch": mx, "checks": checks}
        lines.append(f"  {gpu.name} ({gpu.mem_gib:.2f} GiB): largest micro-batch that fits = {mx}")
        for ch in checks:
            lines.append(f"    micro-batch {ch['micro_batch']:>5}: predicted peak {ch['peak_memory_gb']:6.2f} GiB "
                         f"({ch['phase']}) -> {'fits' if ch['fits'] else 'OOM'}")
    smallest = job.gpu_types[0].name
    ref = args.micro_batch[0] if args.micro_batch else max(1, by_type[smallest]["max_micro_batch"])
    e = estimate(shape, su, ref)
    data = {"setting": "amp-ddp", "max_micro_batch": by_type[smallest]["max_micro_batch"],
            "peak_memory_gb": _gib(e.peak), "peak_at_micro_batch": ref, "phase": e.phase,
            "breakdown_gb": e.table(), "by_gpu_type": by_type, "ds_config": None}
    ddp = f"DDP over {job.world} GPUs" if job.world > 1 else "1 GPU, no DDP"
    head = [f"{shape.name} under open_clip's trainer (AMP fp16, {ddp}, no activation checkpointing, "
            f"{'local' if su.local_loss else 'full'} contrastive loss):"]
    tail = [f"  breakdown at micro-batch {ref} on {smallest} (GiB): "
            + ", ".join(f"{k} {v}" for k, v in e.table().items())]
    return Report(data, head + lines + tail)


def run_search(args: argparse.Namespace, shape: ModelShape, job: Job) -> Report:
    gpu = job.gpu
    budget = (1 - args.margin) * gpu.mem_gib * GiB
    target = None
    if args.global_batch is not None:
        if args.global_batch % job.world:
            raise ValueError(f"--global-batch {args.global_batch} is not a multiple of the world size {job.world} "
                             f"({job.nodes} node(s) x {job.gpus_per_node} GPU(s))")
        target = args.global_batch // job.world
    cands = []
    for su in candidate_setups(precisions_for(gpu, args.precision), job.world):
        cands.append(evaluate(shape, su, job, budget, target, args.local_loss))
        gc = gradcache_variant(shape, cands[-1], job, budget, target, args.local_loss)
        cands += [gc] if gc else []
    ranked = rank(cands, args.allow_accumulation, shape)
    best = ranked[0]
    notes: list[str] = []
    if not best.usable:
        raise ValueError(f"{shape.name} does not fit on {gpu.name} ({gpu.mem_gib:.1f} GiB) with a "
                         f"{args.margin:.0%} margin in any candidate: "
                         + "; ".join(f"{c.label()}: {c.reason}" for c in ranked[:3]))
    assert best.est is not None and best.step_time is not None
    if best.setup.gradcache:
        notes.append(f"GradCache (--accum-freq {best.accum}): {best.accum} chunks of {best.micro} per GPU form one "
                     f"contrastive batch of {args.global_batch}, exactly, for one more forward per chunk")
    elif best.accum > 1:
        notes.append(f"micro-batch {best.micro} x {best.accum} accumulation steps: each contrastive loss sees "
                     f"{best.micro * job.world} samples, not {args.global_batch}")
    for other in job.gpu_types[1:]:
        mx = max_micro_batch(shape, best.setup, (1 - args.margin) * other.mem_gib * GiB)
        notes.append(f"tuned for the partition's smallest GPU ({gpu.name}); on {other.name} nodes the same setup "
                     f"fits micro-batch {mx}")
    workers = workers_for(job, best)
    out = args.out or "ds_config.json"
    meta = {"command": canonical_command(args), "target": f"{job.partition.label} ({gpu.name})",
            "world_size": job.world, "predicted_peak_gb": _gib(best.est.peak),
            "predicted_max_micro_batch": best.max_micro}
    cfg = build_ds_config(best, meta)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
    launch = launch_line(shape.name, job, out, best, workers)
    own = model_shape(shape.name).image_size  # shape itself is already at --image-size
    if args.image_size and args.image_size != own:
        notes.append(f"dtp_ds.train trains at the model's own image size ({own} px): this prediction is for "
                     f"--image-size {args.image_size}")
    rows = []
    for c in ranked:
        rows.append({"candidate": c.label(), "precision": c.setup.precision, "zero_stage": c.setup.stage,
                     "offload": c.setup.offload, "activation_checkpointing": c.setup.ckpt,
                     "local_loss": c.setup.local_loss, "max_micro_batch": c.max_micro, "micro_batch": c.micro,
                     "gradient_accumulation_steps": c.accum, "gradcache": c.setup.gradcache,
                     "peak_memory_gb": _gib(c.est.peak) if c.est else None,
                     "predicted_step_time_s": round(c.step_time, 4) if c.step_time else None,
                     "predicted_samples_per_s": round(c.micro * c.accum * job.world / c.step_time, 1)
                     if c.step_time else None, "unusable": c.reason})
    data = {"setting": "deepspeed", "max_micro_batch": best.max_micro, "micro_batch": best.micro,
            "gradient_accumulation_steps": best.accum, "global_batch": best.micro * best.accum * job.world,
            "accum_freq": best.accum if best.setup.gradcache else None,
            "contrastive_batch": best.micro * best.setup.contrastive_micro * job.world,
            "peak_memory_gb": _gib(best.est.peak),
            "phase": best.est.phase, "breakdown_gb": best.est.table(),
            "host_memory_per_process_gb": _gib(best.est.cpu_per_process),
            "chosen": rows[0], "candidates": rows, "ds_config": cfg, "out": args.out, "workers": workers,
            "launch": launch, "notes": notes}
    lines = [f"{'candidate':<42} {'max mb':>7} {'micro x acc':>12} {'peak GiB':>9} {'samples/s':>10}  note"]
    for r in rows:
        mxa = f"{r['micro_batch']} x {r['gradient_accumulation_steps']}" if r["micro_batch"] else "-"
        peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        sps = f"{r['predicted_samples_per_s']:.0f}" if r["predicted_samples_per_s"] else "-"
        lines.append(f"{r['candidate']:<42} {r['max_micro_batch']:>7} {mxa:>12} {peak:>9} {sps:>10}  "
                     f"{r['unusable'] or ''}")
    how = "GradCache chunks" if best.setup.gradcache else "accumulation"
    lines += ["", f"chosen: {best.label()}, micro-batch {best.micro} x {best.accum} {how} x {job.world} "
                  f"GPU(s) = {best.micro * best.accum * job.world}; predicted peak {best.est.peak_gib:.2f} GiB of "
                  f"{gpu.mem_gib:.2f} ({best.est.phase}); largest micro-batch under the margin {best.max_micro}",
              "  breakdown (GiB): " + ", ".join(f"{k} {v}" for k, v in best.est.table().items())]
    if best.est.cpu_per_process:
        lines.append(f"  host RAM for offloaded states: {best.est.cpu_per_process / GiB:.1f} GiB per GPU process")
    lines += [f"  note: {n}" for n in notes]
    lines += [f"ds_config: {args.out or '(not written: pass --out FILE)'}", f"launch: {launch}"]
    if job.partition.cluster:
        # one launcher task per node (deepspeed starts the ranks), with the GPUs' share of cores
        lines.append(f"slurm: --partition {job.partition.name} --nodes {job.nodes} --ntasks-per-node 1 "
                     f"--gpus-per-node {job.gpus_per_node} --cpus-per-task {job.cores_per_gpu * job.gpus_per_node}")
    return Report(data, lines)


def run_probe(args: argparse.Namespace, shape: ModelShape, rep: Report) -> None:
    """Real training steps on this machine for the chosen config (world size 1)."""
    from .probe import ProbeError, probe_device, probe_max_micro

    device = probe_device()
    cfg = rep.data["ds_config"]
    if cfg is None:
        raise ValueError("--probe needs the deepspeed setting (the engine is what it runs)")
    su = setup_from_ds_config(cfg, world=1)
    budget = args.memory_budget or rep.data["target"]["gpu_mem_gb"]
    # A CPU process has no CUDA context; everything else is predicted alike.
    predicted = max_micro_batch(shape, su, budget * GiB, **({"context_bytes": 0} if device == "cpu" else {}))
    cap = args.probe_cap or max(64, 4 * predicted)
    mode = "cuda: torch.cuda.set_per_process_memory_fraction" if device == "cuda" else \
        "cpu: RLIMIT_AS address-space cap (an emulation of the budget in host memory)"
    try:
        res = probe_max_micro(shape.name, cfg, budget, max(1, predicted), cap, args.image_size, device=device)
    except ProbeError as e:
        rep.data["probe"] = {"mode": mode, "error": str(e)}
        rep.lines.append(f"probe ({mode}) failed: {e}")
        return
    rep.data["probe"] = {"mode": mode, "device": device, "budget_gb": budget, "predicted_max_micro_batch": predicted,
                         **res.to_dict()}
    rep.lines.append(f"probe ({mode}), budget {budget:g} GiB, world size 1: largest micro-batch that ran = "
                     f"{res.max_micro}, predicted {predicted} ({len(res.probes)} probes: "
                     + ", ".join(f"{p.micro}:{'ok' if p.fits else 'OOM'}" for p in res.probes) + ")")


def tune(argv: list[str] | None = None) -> Report:
    """Everything but printing: parse, check the job shape, predict (and probe)."""
    args = build_parser().parse_args(argv)
    part = resolve_target(args.partition, args.gpu_mem)
    job = Job(part, args.nodes, args.gpus_per_node, check_job_shape(part, args.nodes, args.gpus_per_node))
    shape = model_shape(args.model, args.image_size, args.context_length, boundary_rate_arg(args.boundary_rate))
    rep = run_amp_ddp(args, shape, job) if args.setting == "amp-ddp" else run_search(args, shape, job)
    if args.micro_batch and args.setting == "deepspeed":
        best = rep.data["chosen"]
        su = TrainSetup(precision=best["precision"], stage=best["zero_stage"], offload=best["offload"],
                        ckpt=best["activation_checkpointing"], world=job.world, local_loss=best["local_loss"],
                        reduce_bucket_size=TUNED_BUCKET)
        rep.data["checks"] = [{"micro_batch": m, "peak_memory_gb": _gib(estimate(shape, su, m).peak)}
                              for m in args.micro_batch]
        rep.lines += [f"  at micro-batch {c['micro_batch']}: predicted peak {c['peak_memory_gb']} GiB"
                      for c in rep.data["checks"]]
    reducer = None
    if shape.trunk is not None and shape.trunk.reducer != "none":
        tokens = shape.trunk.plan.tokens
        reducer = {"type": shape.trunk.reducer,
                   "rate": None if shape.trunk.rate is None else round(shape.trunk.rate, 4),
                   "min_tokens": round(min(tokens), 1), "tokens_per_block": [round(n, 1) for n in tokens]}
    rep.data = {"model": shape.name,
                "target": {"partition": part.label, "gpu": job.gpu.name, "gpu_mem_gb": job.gpu.mem_gib,
                           "gpu_types": [g.name for g in job.gpu_types], "nodes": job.nodes,
                           "gpus_per_node": job.gpus_per_node, "world_size": job.world,
                           "cores_per_gpu": job.cores_per_gpu, "ram_per_node_gb": job.ram_per_node_gib},
                "data": {"image_size": shape.image_size, "patch_size": shape.patch_size,
                         "image_tokens": shape.image.tokens, "context_length": shape.text.tokens, "reducer": reducer},
                "params": shape.params, "margin": args.margin, **rep.data}
    head = [f"{shape.name} ({shape.params / 1e6:.0f}M params) on {part.label}: {job.nodes} node(s) x "
            f"{job.gpus_per_node} {job.gpu.name} ({job.gpu.mem_gib:.2f} GiB), world size {job.world}; "
            f"image {shape.image_size}px ({shape.image.tokens} tokens), context {shape.text.tokens}"
            + (f", {reducer['type']} reducer" + (f" at rate {reducer['rate']}" if reducer["rate"] is not None else "")
               + f" ({reducer['min_tokens']} tokens at the fewest)" if reducer else ""), ""]
    rep.lines = head + rep.lines
    if args.probe:
        run_probe(args, shape, rep)
    return rep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        rep = tune(argv)
    except (ValueError, JobShapeError, OSError) as e:
        if as_json:
            print(json.dumps({"error": str(e)}))
        print(f"autotune_batch: error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(rep.data))
    else:
        print("\n".join(rep.lines))
    return 0
