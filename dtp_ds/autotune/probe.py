"""The OOM probe: real training steps of the actual model under a real DeepSpeed engine, one
fresh process per micro-batch, and a search for the largest micro-batch that fits.

Each probe runs ``python -m dtp_ds.autotune.probe`` (so an OOM, and whatever the allocator
kept after it, dies with its process) and reads one JSON line back. The memory budget:

* CUDA: ``torch.cuda.set_per_process_memory_fraction(budget / total)`` caps PyTorch's caching
  allocator, so one large GPU stands in for a smaller one; an OOM is
  ``torch.cuda.OutOfMemoryError``. (The CUDA context lies outside the cap, as on a real GPU
  of that size it lies inside the card: budget = card size - context is the faithful setting.)
* CPU (no GPU here, and in CI): ``resource.setrlimit(RLIMIT_AS)`` caps the process's address
  space at what it had after imports and process-group set-up plus the budget; an allocation
  past it fails with ``RuntimeError: ... can't allocate memory`` (or ``MemoryError``). This is
  an emulation: the search logic and the engine run for real, the budget is host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dtp_ds import IMPORT_ROOT
from dtp_ds.autotune.memory import search_max
from dtp_ds.cluster.ports import free_port
from dtp_ds.cluster.process_group import init_process_group

GiB = 2**30
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")
RESULT_PREFIX = "DTP_DS_PROBE_RESULT "


@dataclass
class ProbeResult:
    micro: int
    fits: bool
    oom: bool
    mode: str  # "cuda (set_per_process_memory_fraction)" or "cpu (RLIMIT_AS emulation)"
    peak_gib: float | None = None
    seconds: float = 0.0
    error: str | None = None  # a failure that is not out-of-memory: the search stops
    detail: str | None = None  # the out-of-memory message


@dataclass
class SearchResult:
    max_micro: int
    probes: list[ProbeResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"max_micro_batch": self.max_micro, "probes": [asdict(p) for p in self.probes]}


def _probe_env() -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
            "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            # few malloc arenas: each reserves 64 MB of address space, which RLIMIT_AS counts
            "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # DeepSpeed's real fp16 engine on emulated kernels where the CPU lacks fp16 (see train.main)
            "DTP_DS_ALLOW_EMULATED_FP16": os.environ.get("DTP_DS_ALLOW_EMULATED_FP16", "1"),
            "PYTHONPATH": IMPORT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _parse_result(lines: list[str]) -> ProbeResult | None:
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            return ProbeResult(**json.loads(line[len(RESULT_PREFIX):]))
    return None


def probe_device(device: str = "auto") -> str:
    """"cuda" when a GPU is visible (and not overridden), else "cpu"."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ProbeSession:
    """Runs probes in fresh processes.

    CUDA: one new interpreter per probe (CUDA cannot be forked once initialised, and a fresh
    process is the faithful setting after an OOM). CPU: one server process imports torch,
    DeepSpeed and open_clip once (about 6 s here) and forks a child per probe, which then
    sets its RLIMIT_AS, builds the model and engine and trains, and exits.
    """

    def __init__(self, device: str = "auto", timeout: float = 600.0) -> None:
        self.device = probe_device(device)
        self.timeout = timeout
        self._server: subprocess.Popen[str] | None = None

    def __enter__(self) -> ProbeSession:
        if self.device == "cpu":
            self._server = subprocess.Popen([sys.executable, "-m", "dtp_ds.autotune.probe", "--serve"],
                                            env=_probe_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            assert self._server.stdin is not None
            self._server.stdin.close()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
            self._server = None

    def probe(self, spec: dict[str, Any]) -> ProbeResult:
        spec = {**spec, "device": self.device}
        t0 = time.time()
        if self._server is None:
            try:
                proc = subprocess.run([sys.executable, "-m", "dtp_ds.autotune.probe", json.dumps(spec)],
                                      env=_probe_env(), capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                return ProbeResult(spec["micro"], False, False, "?", error=f"timed out after {self.timeout:.0f} s")
            res = _parse_result(proc.stdout.splitlines())
            if res is None:
                killed = proc.returncode in (-9, 137)  # the kernel's OOM killer is an OOM too
                res = ProbeResult(spec["micro"], False, killed, "?", error=None if killed else
                                  f"probe process failed (exit {proc.returncode}): {(proc.stderr or '')[-2000:]}")
        else:
            assert self._server.stdin is not None and self._server.stdout is not None
            self._server.stdin.write(json.dumps(spec) + "\n")
            self._server.stdin.flush()
            lines: list[str] = []
            res = None
            while res is None:
                line = self._server.stdout.readline()
                if not line:
                    raise ProbeError("the probe server exited")
                lines.append(line.rstrip("\n"))
                res = _parse_result(lines[-1:])
        res.seconds = round(time.time() - t0, 2)
        return res


def _spec(model: str, ds_config: dict[str, Any], micro: int, budget_gib: float, image_size: int | None,
          steps: int) -> dict[str, Any]:
    return {"model": model, "ds_config": ds_config, "micro": micro, "budget_gib": budget_gib,
            "image_size": image_size, "steps": steps}


class ProbeError(RuntimeError):
    """A probe failed for a reason other than memory: the search cannot go on."""


def probe_max_micro(model: str, ds_config: dict[str, Any], budget_gib: float, start: int, cap: int = 1 << 14,
                    image_size: int | None = None, steps: int = 2, rel_tol: float = 0.0,
                    device: str = "auto") -> SearchResult:
    """Search with real probes for the largest micro-batch under ``budget_gib``, starting at
    ``start`` (the memory model's prediction)."""
    result = SearchResult(0)
    with ProbeSession(device) as session:

        def fits(m: int) -> bool:
            r = session.probe(_spec(model, ds_config, m, budget_gib, image_size, steps))
            result.probes.append(r)
            if r.error is not None:
                raise ProbeError(f"micro-batch {m}: {r.error}")
            return r.fits

        result.max_micro = search_max(fits, start, cap, rel_tol)
    return result


# --- the worker (runs in the probe process) ---------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


# Under the CPU address-space cap oneDNN reports a failed scratchpad allocation this way.
CPU_CAP_OOM_MARKERS = ("could not create a primitive",)


def _is_oom(e: BaseException, cpu_cap: bool = False) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    markers = OOM_MARKERS + (CPU_CAP_OOM_MARKERS if cpu_cap else ())
    return any(m in msg for m in markers) or type(e).__name__ == "OutOfMemoryError"


def _worker(spec: dict[str, Any]) -> ProbeResult:
    import resource

    import torch

    micro, budget = int(spec["micro"]), float(spec["budget_gib"]) * GiB
    use_cuda = torch.cuda.is_available() and spec.get("device", "auto") != "cpu"
    mode = "cuda (set_per_process_memory_fraction)" if use_cuda else "cpu (RLIMIT_AS emulation)"
    if use_cuda:
        torch.cuda.set_device(0)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)

    import deepspeed
    import open_clip

    from dtp_ds.tasks import param_groups  # importing the tasks registers the dtp_ds model configs
    from dtp_ds.tasks.clip import CLIPModule
    from dtp_ds.train.ds_config import precision_of
    from dtp_ds.train.precision import DTYPES, check_precision_supported

    cfg = {k: v for k, v in spec["ds_config"].items() if not k.startswith("_")}
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = 1  # accumulation does not move the peak; it only adds steps
    cfg["train_batch_size"] = micro
    cfg.setdefault("steps_per_print", 10**9)
    precision = precision_of(cfg)
    check_precision_supported(precision)
    deepspeed.utils.logger.setLevel("ERROR")
    init_process_group(auto_mpi_discovery=False)

    base, hard = 0, resource.RLIM_INFINITY
    if not use_cuda:
        # Everything from here on (model, engine, optimizer states, activations) must fit.
        base = _status_bytes("VmSize")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (int(base + budget), hard))
    t0 = time.time()
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(spec["model"], output_dict=True, nonscalar_logit_scale=True,
                                       force_image_size=spec.get("image_size"))
        if "activation_checkpointing" in cfg:
            model.set_grad_checkpointing(True)
        task = CLIPModule(model, input_dtype=DTYPES[precision])
        wd = cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
        if "optimizer" not in cfg:
            from dtp_ds.train.ds_config import DEFAULT_OPTIMIZER
            cfg["optimizer"] = DEFAULT_OPTIMIZER
        engine, _, _, _ = deepspeed.initialize(model=task, model_parameters=param_groups(task, wd), config=cfg)
        device = engine.device
        size = model.visual.image_size if hasattr(model.visual, "image_size") else 224
        size = spec.get("image_size") or (size[0] if isinstance(size, (tuple, list)) else size)
        ctx = model.context_length
        vocab = model.vocab_size
        vm_max = 0  # CPU: VmPeak is the process's lifetime high-water mark, so sample VmSize
        for _ in range(int(spec.get("steps", 2))):
            images = torch.randn(micro, 3, size, size, device=device)
            texts = torch.randint(0, vocab, (micro, ctx), device=device)
            out = engine({"image": images, "text": texts})
            vm_max = max(vm_max, 0 if use_cuda else _status_bytes("VmSize"))  # activations at their largest
            engine.backward(out["loss"])
            engine.step()
            vm_max = max(vm_max, 0 if use_cuda else _status_bytes("VmSize"))
            del out, images, texts
        if use_cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_reserved() / GiB
        else:
            peak = (vm_max - base) / GiB
        return ProbeResult(micro, True, False, mode, round(peak, 3), round(time.time() - t0, 2))
    except BaseException as e:  # noqa: BLE001 - classify every failure, OOM or not
        if _is_oom(e, cpu_cap=not use_cuda):
            return ProbeResult(micro, False, True, mode, None, round(time.time() - t0, 2),
                               detail=f"{type(e).__name__}: {e}"[:500])
        return ProbeResult(micro, False, False, mode, None, round(time.time() - t0, 2),
                           error=f"{type(e).__name__}: {e}"[:2000])
    finally:
        if not use_cuda:  # room to report the result
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _serve() -> int:
    """Import once, then fork one child per spec read from stdin (CPU probes only)."""
    import deepspeed  # noqa: F401

    # What DeepSpeed loads lazily on every engine start, loaded once here and inherited by
    # each fork: its optimizer check imports Muon (and with it torch._inductor, seconds of imports),
    # and init_distributed loads the CPU shared-memory collective.
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import open_clip  # noqa: F401
    import torch  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    import dtp_ds  # noqa: F401
    import dtp_ds.tasks  # noqa: F401
    import dtp_ds.train.precision  # noqa: F401

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        try:
            builder.load()
        except Exception:  # noqa: BLE001 - the child will build or fall back as the trainer does
            pass

    for line in sys.stdin:
        spec = json.loads(line)
        rfd, wfd = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # child: its own rendezvous port, its own rlimit, its own engine
            os.close(rfd)
            os.environ["MASTER_PORT"] = str(free_port())
            try:
                data = json.dumps(asdict(_worker(spec)))
            except BaseException as e:  # noqa: BLE001
                data = json.dumps(asdict(ProbeResult(spec["micro"], False, _is_oom(e), "?",
                                                     error=None if _is_oom(e) else f"{type(e).__name__}: {e}")))
            sys.stdout.flush()
            os.write(wfd, data.encode())
            os._exit(0)
        os.close(wfd)
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        data = b"".join(chunks).decode()
        if not data:
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
            data = json.dumps(asdict(ProbeResult(spec["micro"], False, killed, "cpu (RLIMIT_AS emulation)",
                                                 error=None if killed else f"probe child died (status {status})")))
        print(RESULT_PREFIX + data, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="OOM probe worker (internal: run by dtp_ds.autotune)")
    p.add_argument("spec", nargs="?", help="JSON: model, ds_config, micro, budget_gib, image_size, steps, device")
    p.add_argument("--serve", action="store_true", help="read one spec per stdin line, fork a child for each")
    args = p.parse_args(argv)
    if args.serve:
        return _serve()
    res = _worker(json.loads(args.spec))
    print(RESULT_PREFIX + json.dumps(asdict(res)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
