"""The remote side of the pre-flight check, run over ssh on every host **as a file** (so that
a dtp_ds or torch that fails to import is reported instead of killing the probe):

    python /repo/dtp_ds/launch/probe.py info [--slots N]
    python /repo/dtp_ds/launch/probe.py allreduce --rank R --world N --master-addr A --master-port P

Each prints one line ``DTP_DS_PROBE {json}`` on stdout (anything else printed is noise).
Standard library only at module level.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

MARKER = "DTP_DS_PROBE "
# The directory dtp_ds is imported from (a checkout, or site-packages of an install; the same
# as dtp_ds.IMPORT_ROOT, computed here because this file runs before dtp_ds can be imported).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ("torch", "deepspeed", "open_clip", "dtp_ds")


def _fix_path() -> None:
    """As a script, this file's folder leads sys.path: replace it with the repository root."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def source_hash(repo: str = REPO, package: str = "dtp_ds") -> str:
    """sha256 (16 hex) over dtp_ds's sources and configs (model JSONs, ds_configs, partitions):
    equal on two hosts means the same code runs there, committed or not."""
    h = hashlib.sha256()
    files = []
    for top in (package,):  # ds_configs/ of a checkout links into it
        for root, dirs, names in os.walk(os.path.join(repo, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            files += [os.path.join(root, n) for n in names if n.endswith((".py", ".json"))]
    for path in sorted(files):
        h.update(os.path.relpath(path, repo).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def git_revision(repo: str = REPO, short: bool = True) -> str | None:
    """``HEAD`` (12 hex digits, or all with ``short=False``; ``-dirty`` with uncommitted changes
    to tracked files), None outside git."""
    try:
        length = ["--short=12"] if short else []
        rev = subprocess.run(["git", "rev-parse", *length, "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def revision(repo: str = REPO) -> dict[str, Any]:
    return {"git": git_revision(repo), "source": source_hash(repo)}


def info(slots: int | None = None) -> dict[str, Any]:
    """Host name, python, code revision, imports (version or error) and visible GPUs."""
    out: dict[str, Any] = {"host": socket.gethostname(), "python": sys.executable,
                           "python_version": sys.version.split()[0], "repo": REPO, "revision": revision(),
                           "imports": {}, "slots": slots}
    for name in MODULES:
        t0 = time.time()
        try:
            mod = importlib.import_module(name)
            out["imports"][name] = {"ok": True, "version": getattr(mod, "__version__", "?"),
                                    "seconds": round(time.time() - t0, 2), "file": getattr(mod, "__file__", None)}
        except Exception as e:  # any import failure is a finding, not a crash
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            out["imports"][name] = {"ok": False, "error": last[:300]}
    if out["imports"]["torch"]["ok"]:
        import torch

        n = torch.cuda.device_count()
        out["gpus"] = n
        out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(n)]
        out["cuda"] = torch.version.cuda
    return out


def allreduce(rank: int, world: int, addr: str, port: int, backend: str, size_mb: float, iters: int,
              timeout: float) -> dict[str, Any]:
    """Time ``iters`` all-reduces of ``size_mb`` MiB of float32 (after one checked warm-up)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "backend": backend, "ok": False}
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        n = max(1, int(size_mb * 2**20 / 4))
        x = torch.full((n,), float(rank + 1), device=device)
        dist.all_reduce(x)
        expect = world * (world + 1) / 2
        if not torch.allclose(x[:16].cpu(), torch.full((16,), expect)):
            out["error"] = f"wrong sum: {x[0].item()} instead of {expect}"
            return out
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync()
        dt = (time.perf_counter() - t0) / iters
        nbytes = n * 4
        out.update(ok=True, bytes=nbytes, seconds=dt, algbw_gbs=nbytes / dt / 1e9,
                   busbw_gbs=nbytes / dt / 1e9 * 2 * (world - 1) / world)
        dist.barrier()
    except Exception as e:  # reported by the check, with the host's name
        out["error"] = traceback.format_exception_only(type(e), e)[-1].strip()[:400]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="probe.py", description="pre-flight probe (run by dtp_ds.launch.check)")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info")
    i.add_argument("--slots", type=int)
    a = sub.add_parser("allreduce")
    a.add_argument("--rank", type=int, required=True)
    a.add_argument("--world", type=int, required=True)
    a.add_argument("--master-addr", required=True)
    a.add_argument("--master-port", type=int, required=True)
    a.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    a.add_argument("--size-mb", type=float, default=8.0)
    a.add_argument("--iters", type=int, default=5)
    a.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    _fix_path()
    if args.cmd == "info":
        res = info(args.slots)
    else:
        res = allreduce(args.rank, args.world, args.master_addr, args.master_port, args.backend, args.size_mb,
                        args.iters, args.timeout)
    print(MARKER + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
