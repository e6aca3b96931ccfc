"""``tools/gpu_check``: one script for the day a GPU is lent. On one H100 / H200 it runs a fixed
plan of checks in about 8 minutes and writes ``gpu_check.json`` and ``gpu_check.md``:

* **memory** (9 checks): ViT-B-32, ViT-L-14 and ViT-H-14 on a 16, 32 and 40 GB card (the
  registry's V100-16GB, V100-32GB and A100-40GB). Per pair the batch-size tuner
  (``tools/autotune_batch --model M --gpu-mem G``) picks its ds_config and micro-batch; a real
  DeepSpeed engine at world size 1, built as the trainer builds it, runs two steps (the
  trainer's own step, :class:`~dtp_ds.train.trainer.PlainStep`) under
  ``torch.cuda.set_per_process_memory_fraction`` (the card's memory less the CUDA context
  measured at start-up: on a real card the context lies inside it); the peak
  (``max_memory_allocated`` / ``max_memory_reserved`` after ``reset_peak_memory_stats`` past
  the engine's set-up, plus the memory outside the allocator) is set against the memory model's
  prediction (:mod:`dtp_ds.autotune.memory`) at that batch. An out-of-memory is a result: "OOM
  at fraction F".
* **drip-bench-bf16**: ``tools/bench`` (ViT-B-32, DRIP-ViT-B-32-4x, -10x, bf16, batch 256):
  step time against training FLOPs counted on the step as it ran, each as a ratio to ViT-B-32,
  medians with a bootstrap interval over the timed steps (:mod:`dtp_ds.bench.stats`).
* **mfu-ViT-L-14**: model-FLOP utilisation of ViT-L-14 through the engine (bf16, ZeRO-1, no
  activation checkpointing, so no recomputation is counted): FLOPs of one step counted by
  ``FlopCounterMode`` over the median step time (``torch.cuda.Event``) and the card's dense
  16-bit peak (:data:`PEAK_TFLOPS`).
* **zero3-step**: one ZeRO-3 step (the tuner's ZeRO-3 config) and its memory against the model.
* **fp16-step**: fp16 steps with dynamic loss scaling (the shipped ``vit_b_32_fp16.json``): loss
  scale per step, skipped (overflow) steps, a finite loss.

Each check runs in a process of its own (a fresh interpreter on CUDA, where an OOM and what the
allocator kept die with it; a fork of this process on a CPU) under its time budget, and the
report is rewritten as each check ends, so a run cut short still leaves every finished check,
and the rest marked pending. ``--tiny`` (the default without CUDA) runs the same plan with tiny
registered models (``ViT-Tiny-8``, ``DRIP-ViT-Tiny-8-4x``, ...), small batches and tiny "cards"
and without the memory fraction; on a CPU nothing is measured against the memory model (no CUDA
allocator) but the prediction is still made. ``--only`` runs some checks, ``--list`` prints the
plan.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dtp_ds import IMPORT_ROOT

GiB = 2**30
RESULT_PREFIX = "DTP_DS_GPU_CHECK_RESULT "
DEFAULT_DEADLINE_S = 470.0  # the whole full plan, inside 8 minutes with the start-up

# The cards the memory checks stand in for: (label, the registry's GPU type, dtp_ds/cluster/partitions.json).
CARDS = (("16GB", "V100-16GB"), ("32GB", "V100-32GB"), ("40GB", "A100-40GB"))
MEMORY_MODELS = ("ViT-B-32", "ViT-L-14", "ViT-H-14")
BENCH_MODELS = ("ViT-B-32", "DRIP-ViT-B-32-4x", "DRIP-ViT-B-32-10x")

# --tiny: each model's stand-in, the first registered name of its list (names may be renamed;
# else any registered plain tiny model). No 10x tiny DRIP is registered: the 4x upsampling
# variant keeps the bench's three distinct rows.
TINY = {
    "ViT-B-32": ("ViT-Tiny-8", "PatchStem-ViT-Tiny-8"),
    "ViT-L-14": ("PatchStem-ViT-Tiny-8", "ViT-Tiny-8"),
    "ViT-H-14": ("ViT-Tiny-8", "PatchStem-ViT-Tiny-8"),
    "DRIP-ViT-B-32-4x": ("DRIP-ViT-Tiny-8-4x",),
    "DRIP-ViT-B-32-10x": ("DRIP-ViT-Tiny-8-4x-up", "DRIP-ViT-Tiny-8-4x"),
}
TINY_MAX_MICRO = 16  # the tuner picks ~100 for a tiny card: a CPU step at 16 takes a second
TINY_CARD_MICRO = 16  # a tiny "16 GB" card holds the memory model's peak at this micro-batch

# Dense (no sparsity) 16-bit tensor-core peaks, TFLOP/s, by device name (first match wins), from
# NVIDIA's data sheets: H100 SXM5 1,979 bf16 with sparsity = 989 dense; H100 PCIe 1,513 -> 756;
# H100 NVL and H200 NVL 1,671 -> 835; H200 SXM the H100 SXM's tensor cores, 989; A100 312 bf16;
# V100 125 fp16 (the same figures as dtp_ds/cluster/partitions.json's gpu_types).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("V100", 125.0),
)

# Time budgets (s) on one H100 / H200, a fresh interpreter each (imports, CUDA and NCCL set-up,
# model build on the CPU as the trainer does, DeepSpeed set-up, steps). The memory checks of
# ViT-H-14 (a 1B-parameter build each, CPU Adam at 16 GB) come last so that a run cut short keeps
# every other check. Sum: 450 s.
BUDGETS = {
    "memory-ViT-B-32-16GB": 35, "memory-ViT-B-32-32GB": 25, "memory-ViT-B-32-40GB": 25,
    "memory-ViT-L-14-16GB": 30, "memory-ViT-L-14-32GB": 25, "memory-ViT-L-14-40GB": 25,
    "drip-bench-bf16": 60, "mfu-ViT-L-14": 35, "zero3-step": 30, "fp16-step": 25,
    "memory-ViT-H-14-16GB": 55, "memory-ViT-H-14-32GB": 40, "memory-ViT-H-14-40GB": 40,
}
MEMORY_STEPS = 2  # the first step settles what is allocated lazily; the peak is over both
MFU_MICRO_CAP, MFU_DEVICE_FRACTION = 256, 0.8
BENCH_BATCH = 256
OK_STATUSES = ("ok", "oom")  # an out-of-memory is a result; error, timeout and skipped are not


@dataclass
class Check:
    """One planned check: ``params`` say what runs (models are full-size names; ``model`` is
    the one that runs: the same, or its tiny stand-in)."""

    name: str
    kind: str  # memory | bench | mfu | zero3 | fp16
    budget_s: float
    what: str
    params: dict[str, Any] = field(default_factory=dict)


# --- the plan ---------------------------------------------------------------------------------
def tiny_model(name: str) -> str:
    """The registered tiny stand-in for ``name`` (see :data:`TINY`)."""
    import open_clip

    import dtp_ds.models  # noqa: F401  (registers the dtp_ds configs)

    known = set(open_clip.list_models())
    for candidate in TINY.get(name, ()):
        if candidate in known:
            return candidate
    from dtp_ds.models import get_reducer_cfg, list_models

    plain = [m for m in list_models() if "Tiny" in m and get_reducer_cfg(m) is None]
    if plain and not name.startswith("DRIP"):
        return plain[0]
    raise ValueError(f"--tiny: no tiny stand-in registered for {name} (tried {', '.join(TINY.get(name, ()))})")


def build_plan(tiny: bool) -> list[Check]:
    def model(name: str) -> str:
        return tiny_model(name) if tiny else name

    def memory(m: str) -> list[Check]:
        return [Check(f"memory-{m}-{label}", "memory", BUDGETS[f"memory-{m}-{label}"],
                      f"{m} at the tuner's batch for a {label} card ({gpu}): one engine, {MEMORY_STEPS} steps under "
                      f"set_per_process_memory_fraction; measured peak vs the memory model",
                      {"model": model(m), "full_model": m, "card": label, "gpu_type": gpu})
                for label, gpu in CARDS]

    checks = memory(MEMORY_MODELS[0]) + memory(MEMORY_MODELS[1])
    checks.append(Check("drip-bench-bf16", "bench", BUDGETS["drip-bench-bf16"],
                        "tools/bench, bf16: DRIP-ViT-B-32 4x/10x against ViT-B-32, step time and training FLOPs",
                        {"models": [model(m) for m in BENCH_MODELS], "full_models": list(BENCH_MODELS)}))
    checks.append(Check("mfu-ViT-L-14", "mfu", BUDGETS["mfu-ViT-L-14"],
                        "model-FLOP utilisation of ViT-L-14 (bf16 ZeRO-1 engine, no checkpointing): counted FLOPs "
                        "per step / median step time / the card's dense 16-bit peak",
                        {"model": model("ViT-L-14"), "full_model": "ViT-L-14"}))
    checks.append(Check("zero3-step", "zero3", BUDGETS["zero3-step"],
                        "one ZeRO-3 step of ViT-B-32 (the tuner's ZeRO-3 config, bf16): finite loss, memory vs model",
                        {"model": model("ViT-B-32"), "full_model": "ViT-B-32"}))
    checks.append(Check("fp16-step", "fp16", BUDGETS["fp16-step"],
                        "fp16 steps of ViT-B-32 with dynamic loss scaling (ds_configs/vit_b_32_fp16.json): loss "
                        "scale, skipped steps, finite loss",
                        {"model": model("ViT-B-32"), "full_model": "ViT-B-32"}))
    checks += memory(MEMORY_MODELS[2])
    if tiny:
        for c in checks:
            c.what += " [--tiny: tiny model, batch and card" + (", no memory fraction]" if c.kind == "memory" else "]")
    return checks


# --- the card's peak ---------------------------------------------------------------------------
def peak_tflops(device_name: str) -> float | None:
    """The dense 16-bit peak of a GPU by its name (None: not in :data:`PEAK_TFLOPS`)."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# --- the worker (runs in the check's own process) ---------------------------------------------
def _is_oom(e: BaseException) -> bool:
    """The OOM probe's rule (``dtp_ds.autotune.probe``), and cuBLAS / cuDNN failing to allocate."""
    from dtp_ds.autotune.probe import OOM_MARKERS

    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return any(m in str(e).lower() for m in OOM_MARKERS + ("status_alloc_failed",))


def _clean_config(cfg: dict[str, Any], micro: int) -> dict[str, Any]:
    """The engine's config: no tuner metadata, one micro-batch per step (as the OOM probe)."""
    from dtp_ds.train.ds_config import DEFAULT_OPTIMIZER

    out = {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro)
    out.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    out.setdefault("steps_per_print", 10**9)
    return out


def auto_micro(model: str, cfg: dict[str, Any], device_bytes: float, cap: int) -> int:
    """The largest micro-batch (a multiple of 8, at most ``cap``) whose predicted peak fits in
    ``device_bytes`` (the memory model at world size 1)."""
    from dtp_ds.autotune.memory import max_micro_batch, model_shape, setup_from_ds_config

    m = max_micro_batch(model_shape(model), setup_from_ds_config(cfg, 1), device_bytes, upper=cap)
    return max(1, m - m % 8 if m >= 16 else m)


def device_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"type": "cpu", "name": "cpu", "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(0)
    return {"type": "cuda", "name": p.name, "total_gib": round(p.total_memory / GiB, 2),
            "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count, "cuda": torch.version.cuda,
            "peak_tflops_16bit": peak_tflops(p.name)}


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the task and the DeepSpeed engine as ``dtp_ds.train`` does (world size 1), run
    ``warmup + steps`` of the trainer's step and report memory, times, losses, loss scales and
    (``count_flops``) the FLOPs of one more step."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from dtp_ds.cluster.process_group import init_process_group
    from dtp_ds.tasks import TaskSpec, build_task, param_groups
    from dtp_ds.train.ds_config import precision_of
    from dtp_ds.train.guard import NonFiniteGuard
    from dtp_ds.train.metrics import loss_scale
    from dtp_ds.train.precision import DTYPES, check_precision_supported
    from dtp_ds.train.trainer import PlainStep

    cuda = spec["device"] == "cuda"
    res: dict[str, Any] = {"status": "ok", "device": device_info()}
    phase = "set-up"
    try:
        if cuda:
            get_accelerator().set_device(0)
            torch.cuda.init()
        cfg = spec["ds_config"]
        micro = spec["micro"]
        if micro == "auto":
            total = torch.cuda.get_device_properties(0).total_memory if cuda else 8 * GiB
            micro = auto_micro(spec["model"], cfg, MFU_DEVICE_FRACTION * total, spec.get("micro_cap", 256))
        cfg = _clean_config(cfg, int(micro))
        res.update(micro=int(micro), ds_config=cfg)
        precision = precision_of(cfg)
        check_precision_supported(precision)
        deepspeed.utils.logger.setLevel(logging.ERROR)
        init_process_group(auto_mpi_discovery=False)
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            context = total - free - torch.cuda.memory_reserved()  # device-wide: the GPU is this process's
            res["context_gib_at_start"] = context / GiB
            if spec.get("card_gib"):
                fraction = min(1.0, (spec["card_gib"] * GiB - context) / total)
                torch.cuda.set_per_process_memory_fraction(fraction, 0)
                res["fraction"] = fraction

        phase = "model build"
        torch.manual_seed(0)
        task = build_task("clip", TaskSpec(spec["model"], 0, 1, DTYPES[precision]))
        if "activation_checkpointing" in cfg:  # as dtp_ds.train.ds_config.grad_checkpointing_on without the flag
            task.model.set_grad_checkpointing(True)
        size = task.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        ctx, vocab = task.model.context_length, task.model.vocab_size

        phase = "engine set-up"
        wd = cfg["optimizer"]["params"].get("weight_decay", 0.0)
        engine, _, _, _ = deepspeed.initialize(model=task.module, model_parameters=param_groups(task.module, wd),
                                               config=cfg)
        device = engine.device
        g = torch.Generator().manual_seed(1)
        inputs = {"image": torch.randn(micro, 3, size, size, generator=g),
                  "text": torch.randint(1, vocab, (micro, ctx), generator=g)}
        if spec.get("inputs_on_device"):  # timing: no host-to-device copy inside the step
            inputs = {k: v.to(device) for k, v in inputs.items()}
        with tempfile.TemporaryDirectory() as tmp:
            step = PlainStep(engine, NonFiniteGuard(engine, precision, 10**6, 0, tmp), device)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                res["allocated_after_setup_gib"] = torch.cuda.memory_allocated() / GiB

            def one(i: int) -> float:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out, _ = step(inputs, i)
                    end.record()
                    torch.cuda.synchronize()
                    seconds = start.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    out, _ = step(inputs, i)
                    seconds = time.perf_counter() - t0
                res["losses"].append(float(out["loss"].detach()))
                res["loss_scales"].append(loss_scale(engine))
                return seconds

            res.update(losses=[], loss_scales=[], warmup_times=[], step_times=[])
            warmup, steps = int(spec.get("warmup", 0)), int(spec.get("steps", 1))
            i = 0
            # fp16: past ``steps``, on until an update is applied (the first ones overflow at 2^16)
            while i < warmup + steps or (engine.skipped_steps >= i and i < spec.get("until_applied", 0)):
                phase = f"step {i + 1}"
                res["warmup_times" if i < warmup else "step_times"].append(one(i + 1))
                i += 1
            res["skipped_steps"] = int(engine.skipped_steps)
            res["steps_run"] = i
            if cuda:
                torch.cuda.synchronize()
                res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
                res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
                free, total = torch.cuda.mem_get_info()
                res["outside_allocator_gib"] = (total - free - torch.cuda.memory_reserved()) / GiB
            if spec.get("count_flops"):
                phase = "FLOP count"
                counter = FlopCounterMode(display=False)
                with counter:  # one more step as the timed ones ran (not timed: the counter's dispatch costs)
                    step(inputs, i + 1)
                res["flops_per_step"] = float(counter.get_total_flops())  # 2 per multiply-add
    except BaseException as e:  # noqa: BLE001 - an OOM is a result, anything else a failure to report
        if _is_oom(e):
            res.update(status="oom", oom_in=phase, detail=f"{type(e).__name__}: {e}"[:600])
        else:
            res.update(status="error", error_in=phase, error=traceback.format_exc()[-3000:])
    return res


def worker_env(device: str) -> dict[str, str]:
    """A lone rank's environment (as the OOM probe's, less its RLIMIT_AS settings)."""
    from dtp_ds.cluster.ports import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if device == "cpu":  # DeepSpeed's real fp16 engine on emulated kernels (dtp_ds.train.precision)
        env["DTP_DS_ALLOW_EMULATED_FP16"] = os.environ.get("DTP_DS_ALLOW_EMULATED_FP16", "1")
    return env


# --- running a check in its own process -------------------------------------------------------
@dataclass
class ProcessResult:
    status: str  # "done", "timeout" or "died"
    seconds: float
    result: dict[str, Any] | None = None
    stdout: str = ""
    detail: str = ""


class Isolated:
    """Runs worker specs and commands in processes of their own, each under a timeout; their
    output goes to ``log`` (one file for the whole run)."""

    def __init__(self, isolation: str, log: Path) -> None:
        self.isolation, self.log = isolation, log

    def _append(self, header: str, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"\n===== {header} =====\n{text}")

    def worker(self, name: str, spec: dict[str, Any], timeout: float) -> ProcessResult:
        if self.isolation == "fork":
            return self._fork(name, spec, timeout)
        cmd = [sys.executable, "-m", "dtp_ds.bench.gpu_check", "--worker"]
        pr = self.command(name, cmd, timeout, env=worker_env(spec["device"]), stdin=json.dumps(spec))
        for line in reversed(pr.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                pr.result = json.loads(line[len(RESULT_PREFIX):])
                break
        if pr.result is None and pr.status == "done":
            pr.status = "died"
        return pr

    def command(self, name: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                stdin: str | None = None) -> ProcessResult:
        """``cmd`` in a new session (so a timeout ends whatever it started): stdout returned,
        stdout and stderr logged."""
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env={**os.environ, **(env or {})}, start_new_session=True, cwd=IMPORT_ROOT)
            status = "done"
            try:
                out, _ = proc.communicate(stdin, timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                status = "timeout"
            err.seek(0)
            errtext = err.read()
        self._append(f"{name}: {shlex.join(cmd)} (exit {proc.returncode})", (out or "") + errtext)
        detail = ""
        if status == "done" and proc.returncode != 0:
            status = "died"
            detail = f"exit {proc.returncode}: {errtext[-2000:]}"
            if proc.returncode in (-9, 137):
                detail = f"killed (exit {proc.returncode}: the kernel's OOM killer?) " + detail
        return ProcessResult(status, time.monotonic() - t0, None, out or "", detail)

    def _fork(self, name: str, spec: dict[str, Any], timeout: float) -> ProcessResult:
        """CPU: a fork of this process (imports paid once), its output appended to the log."""
        t0 = time.monotonic()
        self._append(f"{name}: forked worker", "")
        rfd, wfd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                os.close(rfd)
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(worker_env(spec["device"]))
                data = json.dumps(run_engine(spec), default=str).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(wfd, view):]
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(wfd)
        chunks, status = [], "done"
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    status = "timeout"
                    os.kill(pid, signal.SIGKILL)
                    break
                ready, _, _ = select.select([rfd], [], [], left)
                if ready:
                    chunk = os.read(rfd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
        finally:
            os.close(rfd)
            _, wstatus = os.waitpid(pid, 0)
        pr = ProcessResult(status, time.monotonic() - t0)
        if status == "done":
            try:
                pr.result = json.loads(b"".join(chunks).decode())
            except ValueError:
                pr.status, pr.detail = "died", f"worker wait status {wstatus}: see the log"
        return pr


# --- the checks, on the parent's side ---------------------------------------------------------
def _gib(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _cpu_precision(cfg: dict[str, Any], device: str) -> tuple[dict[str, Any], str | None]:
    """On a CPU without native bf16, a bf16 config trains in fp32, as ``dtp_ds.train`` does."""
    from dtp_ds.train.ds_config import cpu_has_native_bf16, precision_of

    if device != "cpu" or precision_of(cfg) != "bf16" or cpu_has_native_bf16():
        return cfg, None
    cfg = copy.deepcopy(cfg)
    cfg["bf16"]["enabled"] = False
    return cfg, "bf16 -> fp32: this CPU has no native bf16 (as dtp_ds.train resolves it)"


def prediction(model: str, cfg: dict[str, Any], micro: int, device: str) -> dict[str, Any]:
    """The memory model's peak for ``cfg`` at ``micro`` (world size 1); a CPU process has no
    CUDA context (as the tuner's probe predicts it there)."""
    from dtp_ds.autotune.memory import estimate, model_shape, setup_from_ds_config

    setup = setup_from_ds_config(cfg, 1)
    est = estimate(model_shape(model), setup, micro, **({"context_bytes": 0} if device == "cpu" else {}))
    allocated = sum(v for k, v in est.components.items() if k not in ("cuda_context", "nccl", "fragmentation"))
    return {"peak_gib": _gib(est.peak / GiB), "allocated_gib": _gib(allocated / GiB), "phase": est.phase,
            "breakdown_gib": est.table(),
            "setup": f"{setup.precision} zero{setup.stage}" + ("" if setup.offload == "none" else
                                                                 f" offload-{setup.offload}")
                     + (" ckpt" if setup.ckpt else "")}


def _measured(res: dict[str, Any], pred: dict[str, Any] | None) -> dict[str, Any]:
    """Measured peaks and their ratios to the prediction (CUDA only)."""
    if "peak_allocated_gib" not in res:
        return {}
    total = res["peak_reserved_gib"] + res.get("outside_allocator_gib", 0.0)
    out = {"peak_allocated_gib": _gib(res["peak_allocated_gib"]), "peak_reserved_gib": _gib(res["peak_reserved_gib"]),
           "outside_allocator_gib": _gib(res.get("outside_allocator_gib")), "measured_peak_gib": _gib(total)}
    if pred:
        out["allocated_ratio"] = round(res["peak_allocated_gib"] / pred["allocated_gib"], 3)
        out["peak_ratio"] = round(total / pred["peak_gib"], 3)
    return out


class Runner:
    def __init__(self, device: str, tiny: bool, isolated: Isolated) -> None:
        self.device, self.tiny, self.isolated = device, tiny, isolated
        self.device_info: dict[str, Any] | None = None

    def run(self, check: Check, timeout: float) -> dict[str, Any]:
        return getattr(self, f"_{check.kind}")(check, timeout)

    def _engine(self, check: Check, spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the worker's result, the row fields every engine check shares)."""
        spec = {"device": self.device, **spec}
        pr = self.isolated.worker(check.name, spec, timeout)
        res = pr.result or {}
        if res.get("device") and self.device_info is None:
            self.device_info = res["device"]
        row: dict[str, Any] = {"status": res.get("status", pr.status) if pr.status == "done" else pr.status}
        if pr.status == "timeout":
            row["result"] = f"not finished within its {timeout:.0f} s budget (killed)"
        elif pr.status == "died":
            row["result"] = f"the worker died: {pr.detail[-300:]}"
            row["error"] = pr.detail
        elif res.get("status") == "error":
            row["result"] = f"error in {res.get('error_in')}: {res['error'].strip().splitlines()[-1][:300]}"
            row["error"] = res["error"]
        for k in ("micro", "fraction", "context_gib_at_start", "losses", "loss_scales", "skipped_steps", "steps_run",
                  "step_times", "warmup_times", "allocated_after_setup_gib", "flops_per_step", "oom_in", "detail",
                  "ds_config"):
            if k in res:
                row[k] = res[k]
        return res, row

    def _memory(self, check: Check, timeout: float) -> dict[str, Any]:
        from dtp_ds.autotune.memory import estimate, model_shape, setup_from_ds_config
        from dtp_ds.autotune.tuner import tune
        from dtp_ds.cluster.partitions import load_registry

        p = check.params
        model = p["model"]
        card = load_registry()["gpu_types"][p["gpu_type"]]["gpu_mem_gib"]
        row: dict[str, Any] = {"model": model, "stand_in_for": p["full_model"], "card": p["gpu_type"]}
        if self.tiny:  # a tiny card: the memory model's peak at a small batch, scaled by the card's size
            from dtp_ds.autotune.memory import TrainSetup

            base = estimate(model_shape(model), TrainSetup(precision="bf16"), TINY_CARD_MICRO).peak / GiB
            card = round(base / 0.9 * card / load_registry()["gpu_types"][CARDS[0][1]]["gpu_mem_gib"], 3)
            row["card"] = f"tiny ({card:g} GiB for {p['gpu_type']})"
        argv = ["--model", model, "--gpu-mem", f"{card:g}"]
        tuned = tune(argv).data
        cfg, micro = tuned["ds_config"], tuned["micro_batch"]
        row.update(tuner=f"tools/autotune_batch {shlex.join(argv)}", tuner_choice=tuned["chosen"]["candidate"],
                   tuner_micro=micro, tuner_peak_gib=tuned["peak_memory_gb"], card_gib=card)
        notes = []
        if self.tiny and micro > TINY_MAX_MICRO:
            notes.append(f"micro-batch {TINY_MAX_MICRO}, not the tuner's {micro} (--tiny)")
            micro = TINY_MAX_MICRO
        cfg, note = _cpu_precision(cfg, self.device)
        notes += [note] if note else []
        pred = prediction(model, _clean_config(cfg, micro), micro, self.device)
        row.update(micro=micro, setup=pred["setup"], prediction=pred)
        spec = {"model": model, "ds_config": cfg, "micro": micro, "steps": MEMORY_STEPS if not self.tiny else 1,
                "card_gib": None if self.tiny else card}
        res, fields = self._engine(check, spec, timeout)
        row.update(fields)
        row["measured"] = _measured(res, pred)
        setup = setup_from_ds_config(_clean_config(cfg, micro), 1)
        if row["status"] == "oom":
            frac = res.get("fraction")
            where = f"fraction {frac:.4f} ({card:g} GiB card)" if frac else "(no fraction: the whole device)"
            row["result"] = (f"OOM at {where} in {res.get('oom_in')}: predicted {pred['peak_gib']} GiB "
                             f"({pred['phase']}) at micro-batch {micro}")
        elif row["status"] == "ok":
            m = row["measured"]
            if m:
                row["result"] = (f"fits: allocated {m['peak_allocated_gib']} GiB vs {pred['allocated_gib']} "
                                 f"predicted (x{m['allocated_ratio']}); reserved + outside the allocator "
                                 f"{m['measured_peak_gib']} vs {pred['peak_gib']} (x{m['peak_ratio']}); card "
                                 f"{card:g} GiB")
            else:
                row["result"] = (f"ran (CPU: no CUDA allocator to measure); predicted {pred['peak_gib']} GiB "
                                 f"({pred['phase']}, {setup.precision} ZeRO-{setup.stage})")
        if notes:
            row["notes"] = notes
        return row

    def _mfu(self, check: Check, timeout: float) -> dict[str, Any]:
        from dtp_ds.bench.stats import median_ci
        from dtp_ds.train.ds_config import default_ds_config, load_ds_config

        model = check.params["model"]
        cfg = load_ds_config(default_ds_config(check.params["full_model"]))
        cfg.pop("activation_checkpointing", None)  # model FLOPs: no recomputation in the count
        cfg, note = _cpu_precision(cfg, self.device)
        spec = {"model": model, "ds_config": cfg, "micro": TINY_MAX_MICRO if self.tiny else "auto",
                "micro_cap": MFU_MICRO_CAP, "warmup": 1 if self.tiny else 3, "steps": 2 if self.tiny else 8,
                "count_flops": True, "inputs_on_device": True}
        res, row = self._engine(check, spec, timeout)
        row.update(model=model, stand_in_for=check.params["full_model"])
        if note:
            row["notes"] = [note]
        if "micro" in res:
            pred = prediction(model, _clean_config(cfg, res["micro"]), res["micro"], self.device)
            row.update(setup=pred["setup"], prediction=pred, measured=_measured(res, pred))
        if row["status"] == "ok" and res.get("step_times") and res.get("flops_per_step"):
            iv = median_ci(res["step_times"])
            achieved = res["flops_per_step"] / iv.mean / 1e12
            peak = (res.get("device") or {}).get("peak_tflops_16bit")
            row.update(step_s=iv.mean, step_s_ci95=iv.as_list(), tflops_per_step=res["flops_per_step"] / 1e12,
                       achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None)
            row["result"] = (f"{achieved:.1f} TFLOP/s achieved ({res['flops_per_step'] / 1e12:.2f} TFLOP per step, "
                             f"median step {iv.mean * 1e3:.1f} ms over {iv.n})"
                             + (f": MFU {achieved / peak:.1%} of {peak:g} dense 16-bit" if peak else
                                ": MFU n/a (no peak figure for this device)"))
        return row

    def _zero3(self, check: Check, timeout: float) -> dict[str, Any]:
        from dtp_ds.autotune.memory import TrainSetup
        from dtp_ds.autotune.tuner import TUNED_BUCKET, Candidate, build_ds_config

        model = check.params["model"]
        micro = 8 if self.tiny else BENCH_BATCH
        cfg = build_ds_config(Candidate(TrainSetup(precision="bf16", stage=3, reduce_bucket_size=TUNED_BUCKET),
                                        micro=micro, accum=1))
        cfg, note = _cpu_precision(cfg, self.device)
        pred = prediction(model, _clean_config(cfg, micro), micro, self.device)
        res, row = self._engine(check, {"model": model, "ds_config": cfg, "micro": micro, "steps": 1}, timeout)
        row.update(model=model, stand_in_for=check.params["full_model"], micro=micro, setup=pred["setup"],
                   prediction=pred, measured=_measured(res, pred))
        if note:
            row["notes"] = [note]
        if row["status"] == "ok":
            loss = res["losses"][-1]
            row["status"] = "ok" if math.isfinite(loss) else "error"
            m = row["measured"]
            row["result"] = (f"one ZeRO-3 step: loss {loss:.4f}"
                             + (f"; allocated {m['peak_allocated_gib']} GiB vs {pred['allocated_gib']} predicted "
                                f"(x{m['allocated_ratio']})" if m else ""))
        return row

    def _fp16(self, check: Check, timeout: float) -> dict[str, Any]:
        from dtp_ds.train.ds_config import default_ds_config, load_ds_config

        model = check.params["model"]
        micro = 8 if self.tiny else BENCH_BATCH
        cfg = load_ds_config(default_ds_config(check.params["full_model"], bf16=False))
        pred = prediction(model, _clean_config(cfg, micro), micro, self.device)
        spec = {"model": model, "ds_config": cfg, "micro": micro, "steps": 2, "until_applied": 12 if self.tiny else 20}
        res, row = self._engine(check, spec, timeout)
        row.update(model=model, stand_in_for=check.params["full_model"], micro=micro, setup=pred["setup"],
                   prediction=pred, measured=_measured(res, pred))
        if row["status"] == "ok":
            losses, scales = res["losses"], res["loss_scales"]
            finite = all(math.isfinite(x) for x in losses)
            scaled = all(s is not None and s >= 1 for s in scales)
            applied = res["steps_run"] - res["skipped_steps"]
            row["status"] = "ok" if finite and scaled and applied else "error"
            row["result"] = (f"{res['steps_run']} fp16 steps, {res['skipped_steps']} skipped on overflow "
                             f"({applied} applied); loss scale per step {', '.join(f'{s:g}' for s in scales)}; "
                             f"losses {', '.join(f'{x:.3f}' for x in losses)}"
                             + ("" if finite else "; a loss is not finite") + ("" if scaled else "; no loss scale")
                             + ("" if applied else "; no update applied"))
        return row

    def _bench(self, check: Check, timeout: float) -> dict[str, Any]:
        from dtp_ds.bench.stats import median_ci

        tool = Path(IMPORT_ROOT) / "tools" / "bench"
        exe = str(tool) if tool.is_file() else shutil.which("dtp-bench")
        models = check.params["models"]
        row: dict[str, Any] = {"model": ", ".join(models), "stand_in_for": ", ".join(check.params["full_models"]),
                               "setup": "bf16 autocast, plain PyTorch (tools/bench)"}
        if exe is None:
            return {**row, "status": "error", "result": "tools/bench not found (neither in the checkout nor on PATH)"}
        batch = 4 if self.tiny else BENCH_BATCH
        argv = ["--models", *models, "--device", self.device, "--batch-size", str(batch), "--precision", "bf16",
                "--warmup", "1" if self.tiny else "3", "--steps", "3" if self.tiny else "10", "--json"]
        row.update(command=shlex.join(["tools/bench", *argv]), micro=batch)
        pr = self.isolated.command(check.name, [sys.executable, exe, *argv], timeout)
        if pr.status != "done":
            return {**row, "status": pr.status, "error": pr.detail,
                    "result": pr.detail[-300:] if pr.detail else f"not finished within its {timeout:.0f} s budget"}
        start = pr.stdout.find("{") if pr.stdout.startswith("{") else pr.stdout.find("\n{") + 1
        rows = json.JSONDecoder().raw_decode(pr.stdout[start:])[0]["rows"]
        keep = ("model", "compression", "clip_train_gflops", "clip_train_gflops_ratio", "train_gflops_ratio",
                "step_s", "step_s_ratio", "step_vs_flops", "image_step_s_ratio", "image_step_vs_flops",
                "samples_per_s", "peak_mem_gb", "step_times")
        out = []
        for r in rows:
            iv = median_ci(r["step_times"])
            out.append({**{k: r[k] for k in keep if k in r}, "step_s_median": iv.mean, "step_s_ci95": iv.as_list()})
        row.update(status="ok", rows=out)
        parts = []
        for r in out[1:]:
            parts.append(f"{r['model']}: step x{r['step_s_ratio']:.2f}, CLIP train FLOPs "
                         f"x{r['clip_train_gflops_ratio']:.2f}, step/FLOPs {r['step_vs_flops']:.2f} (target <= 1.15), "
                         f"image f+b/FLOPs {r['image_step_vs_flops']:.2f}, compression {r['compression']:.2f}")
        row["result"] = f"vs {out[0]['model']} ({out[0]['step_s_median'] * 1e3:.1f} ms/step): " + "; ".join(parts)
        return row


# --- the report ----------------------------------------------------------------------------------
COLUMNS = ("check", "status", "s / budget", "model", "micro", "setup", "predicted peak GiB (memory model)",
           "measured peak GiB", "measured / predicted", "result")


def _cell(x: Any) -> str:
    return "-" if x is None or x == "" else str(x).replace("|", "/").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    d = report["device"] or {}
    head = [f"# GPU check ({report['mode']})", "",
            f"- device: {d.get('name', '?')}" + (f", {d['total_gib']} GiB, compute {d['capability']}, CUDA "
                                                    f"{d['cuda']}, dense 16-bit peak "
                                                    f"{d.get('peak_tflops_16bit') or '?'} TFLOP/s"
                                                    if d.get("type") == "cuda" else ""),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
            f"- command: `{report['command']}`",
            *([f"- before the plan: DeepSpeed's CPU Adam op {report['prepare']['status']} in "
               f"{report['prepare']['seconds']} s"] if report.get("prepare") else []),
            f"- started {report['started']}; {report['done']} of {len(report['checks'])} checks done"
            + (f", finished in {report['seconds']:.0f} s" if report["finished"] else " (running or cut short)"),
            ""]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in report["checks"]:
        pred, meas = c.get("prediction") or {}, c.get("measured") or {}
        if c["kind"] == "bench":
            predicted = "not modelled (plain PyTorch)"
        elif pred:
            predicted = f"{pred['peak_gib']} ({pred['phase']})"
            if report["device_type"] == "cpu":
                predicted += ", CPU process: no CUDA context"
        else:
            predicted = "no prediction: " + ("not run yet" if c["status"] == "pending" else "the check stopped first")
        measured = meas.get("measured_peak_gib")
        if measured is None and c["status"] not in ("pending", "skipped"):
            measured = "n/a (CPU: no CUDA allocator)" if report["device_type"] == "cpu" else None
        ratio = meas.get("peak_ratio")
        spent = f"{c['seconds']:.0f}" if c.get("seconds") is not None else "-"
        seconds = f"{spent} / {c['budget_s']:.0f}"
        cells = [c["name"], c["status"], seconds, c.get("model"), c.get("micro"), c.get("setup"), predicted, measured,
                 ratio, c.get("result")]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    notes = ["", "## Reading it", "",
             "- predicted peak: `dtp_ds/autotune/memory.py` at the batch that ran (world size 1): CUDA context "
             "0.5 GiB + 1.05 x the larger phase; measured peak: `max_memory_reserved` + the memory outside the "
             "allocator (context, NCCL, libraries; device-wide) after the engine's set-up; the JSON has "
             "`max_memory_allocated` against the model's allocated part (its parts without context and "
             "fragmentation).",
             "- memory checks: the tuner's ds_config and micro-batch for the card (`tuner` in the JSON), the cap "
             "`set_per_process_memory_fraction((card - context at start-up) / device memory)`; an OOM is a result.",
             "- drip-bench-bf16: one `tools/bench` process; step s is the median of its timed steps with a bootstrap "
             "interval over those steps (not over processes: `tools/bench --repeats N` for that).",
             "- mfu: FlopCounterMode's FLOPs of one engine step (2 per multiply-add, forward + backward) / median step "
             "time (CUDA events) / the device's dense 16-bit peak."]
    if report["mode"].startswith("tiny"):
        notes.append("- --tiny: tiny registered models stand in (column model; `stand_in_for` in the JSON), tiny "
                     "cards and batches, no memory fraction: the plan's structure, not its numbers.")
    return "\n".join(head + lines + notes) + "\n"


class Report:
    def __init__(self, out: Path, plan: list[Check], mode: str, device_type: str, command: str) -> None:
        self.json_path, self.md_path = out / "gpu_check.json", out / "gpu_check.md"
        self.t0 = time.monotonic()
        self.data: dict[str, Any] = {
            "tool": "tools/gpu_check", "mode": mode, "device_type": device_type, "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "finished": False, "done": 0,
            "seconds": None, "device": None, "versions": _versions(),
            "plan": [asdict(c) for c in plan], "planned_seconds": sum(c.budget_s for c in plan),
            "checks": [{"name": c.name, "kind": c.kind, "what": c.what, "budget_s": c.budget_s, "status": "pending",
                        "model": c.params.get("model") or ", ".join(c.params.get("models", []))} for c in plan]}
        self.write()

    def record(self, i: int, row: dict[str, Any], device: dict[str, Any] | None) -> None:
        self.data["checks"][i].update(row)
        self.data["done"] = sum(c["status"] != "pending" for c in self.data["checks"])
        if device and not self.data["device"]:
            self.data["device"] = device
        self.write()

    def finish(self) -> None:
        self.data.update(finished=True, seconds=round(time.monotonic() - self.t0, 1))
        self.write()

    def write(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.data, indent=2, default=str) + "\n"),
                           (self.md_path, markdown(self.data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # a reader (or a run killed mid-write) sees the old or the new report


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "deepspeed", "open_clip_torch", "timm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


# --- the command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="logs/gpu_check", help="directory for gpu_check.json, gpu_check.md and "
                   "gpu_check.log (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", default=None,
                      help="tiny models, batches and cards, no memory fraction (the default without CUDA)")
    size.add_argument("--full", dest="tiny", action="store_false", help="the full plan (the default on CUDA)")
    p.add_argument("--only", nargs="+", metavar="CHECK", help="run these checks of the plan only (names: --list)")
    p.add_argument("--deadline", type=float, help=f"seconds for the whole run: a check that would start past it is "
                   f"skipped, one that would run past it gets what is left (default: {DEFAULT_DEADLINE_S:g} for the "
                   f"full plan, the sum of the budgets for --tiny)")
    p.add_argument("--isolation", choices=["auto", "exec", "fork"], default="auto",
                   help="a fresh interpreter per check (exec; auto on CUDA) or a fork of this one (auto on a CPU)")
    p.add_argument("--list", action="store_true", help="print the plan and its budgets, run nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one spec on stdin
    return p


def preload() -> None:
    """What every fork would import or load on its own, once (as the OOM probe's CPU server):
    DeepSpeed's optimizer check imports Muon (and torch._inductor with it), its process group
    loads the CPU shared-memory collective, ZeRO-Offload loads CPU Adam. The ops are loaded with
    the interpreter's ninja first on PATH (``import dtp_ds`` puts it there), as every rank loads them
    (another ninja would take their build for stale and rebuild it)."""
    import deepspeed  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import open_clip  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    import dtp_ds.tasks  # noqa: F401
    import dtp_ds.train.guard  # noqa: F401
    import dtp_ds.train.trainer  # noqa: F401  (import dtp_ds put the interpreter's ninja first)

    for op in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(op)
        if builder is not None:
            try:
                builder.load()
            except Exception:  # noqa: BLE001 - each fork then builds or falls back as the trainer does
                pass


PREPARE_OPS = """
import time
t = time.time()
import dtp_ds  # puts the interpreter's ninja first on PATH
from deepspeed.ops.op_builder import CPUAdamBuilder
CPUAdamBuilder().load()
print(f"CPU Adam loaded in {time.time() - t:.1f} s")
"""
PREPARE_TIMEOUT_S = 300


def prepare_ops(isolated: Isolated) -> dict[str, Any]:
    """Load (JIT-building on a fresh machine, a minute or more) DeepSpeed's CPU Adam, which
    ZeRO-Offload needs (the tuner offloads ViT-H-14's optimizer on a 16 GB card), before the
    plan's clock starts; ``make venv`` builds it ahead."""
    pr = isolated.command("prepare: CPU Adam", [sys.executable, "-c", PREPARE_OPS], PREPARE_TIMEOUT_S,
                          env={"PYTHONPATH": IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return {"op": "CPUAdamBuilder", "status": "ok" if pr.status == "done" else pr.status,
            "seconds": round(pr.seconds, 1), "detail": pr.detail[-500:]}


def _worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    res = run_engine(spec)
    print(RESULT_PREFIX + json.dumps(res, default=str), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker_main()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights per model
    import torch

    cuda = torch.cuda.is_available()  # no CUDA context here: each check's process makes its own
    tiny = (not cuda) if args.tiny is None else args.tiny
    if not tiny and not cuda:
        print("gpu_check: --full needs a CUDA GPU (this machine has none): --tiny runs the plan at tiny sizes",
              file=sys.stderr)
        return 2
    plan = build_plan(tiny)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in plan})
        if unknown:
            print(f"gpu_check: unknown check(s) {', '.join(unknown)}; the plan: {', '.join(c.name for c in plan)}",
                  file=sys.stderr)
            return 2
        plan = [c for c in plan if c.name in args.only]
    if args.list:
        for c in plan:
            print(f"{c.name:<24} {c.budget_s:>4.0f} s  {c.what}")
        print(f"{'total':<24} {sum(c.budget_s for c in plan):>4.0f} s")
        return 0
    device = "cuda" if cuda else "cpu"
    isolation = args.isolation if args.isolation != "auto" else ("exec" if cuda else "fork")
    if isolation == "fork" and cuda:
        print("gpu_check: --isolation fork is for CPUs (CUDA cannot be forked once initialised)", file=sys.stderr)
        return 2
    if isolation == "fork":
        preload()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    mode = ("tiny" if tiny else "full") + f" ({device}, {isolation})"
    command = shlex.join(["tools/gpu_check", *(sys.argv[1:] if argv is None else argv)])
    report = Report(out, plan, mode, device, command)
    isolated = Isolated(isolation, log)
    runner = Runner(device, tiny, isolated)
    if isolation == "exec" and not tiny:
        print("gpu_check: loading DeepSpeed's CPU Adam (built on first use) before the plan", file=sys.stderr,
              flush=True)
        report.data["prepare"] = prepare_ops(isolated)
        report.write()
    deadline = args.deadline or (DEFAULT_DEADLINE_S if not tiny else sum(c.budget_s for c in plan))
    t0 = time.monotonic()
    print(f"gpu_check: {len(plan)} checks, {mode}; report in {report.md_path}", file=sys.stderr, flush=True)
    for i, check in enumerate(plan):
        left = deadline - (time.monotonic() - t0)
        started = time.monotonic()
        if left < 5:
            row: dict[str, Any] = {"status": "skipped", "result": f"not started: {max(left, 0):.0f} s left of the "
                                                                   f"{deadline:.0f} s deadline"}
        else:
            try:
                row = runner.run(check, min(check.budget_s, left))
            except Exception:  # noqa: BLE001 - the parent's side of one check failed: record it, go on
                row = {"status": "error", "error": traceback.format_exc()[-3000:],
                       "result": "error before or after the run: " + traceback.format_exc().strip().splitlines()[-1]}
        row["seconds"] = round(time.monotonic() - started, 1)
        report.record(i, row, runner.device_info)
        print(f"  {check.name}: {row['status']} ({row['seconds']:.0f} s) {row.get('result', '')}"[:300],
              file=sys.stderr, flush=True)
    if report.data["device"] is None:
        report.data["device"] = {"type": device, "name": device}
    # Each check's process measures the memory outside its allocator device-wide: this process must hold no context.
    report.data["parent_cuda_initialized"] = bool(cuda and torch.cuda.is_initialized())
    report.finish()
    bad = [c["name"] for c in report.data["checks"] if c["status"] not in OK_STATUSES]
    print(f"gpu_check: {report.md_path}, {report.json_path}" + (f"; not ok: {', '.join(bad)}" if bad else ""),
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
