"""Pre-flight check of a hostfile before a multi-node run:

    python -m dtp_ds.launch.check --hostfile hostfiles/loopback [--ssh-port 22] [--json]

On every host, over ssh (the way DeepSpeed's pdsh runner reaches it): reachable without a
password, the same code (git revision and a hash of dtp_ds's sources), torch / deepspeed /
open_clip / dtp_ds import (same torch and deepspeed versions everywhere), GPUs visible against
the hostfile's slots (0 on a CPU machine is fine and said). Then one rank per host runs a small
all-reduce across all hosts (gloo, or NCCL where every host has GPUs) and its bandwidth is shown.
A table, and exit status 1 when anything failed.

Host names are validated (``dtp_ds.launch.hostnames``) and passed to ssh after ``--`` as one
argument; the remote command is built from ``shlex.quote``-d words.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dtp_ds.launch import probe
from dtp_ds.launch.hostfile import HostfileError, read_hostfile

REPO = probe.REPO
PROBE = os.path.join("dtp_ds", "launch", "probe.py")


@dataclass
class SSH:
    """How to reach a host: port, extra ``-o`` options, connect timeout."""

    port: int | None = None
    options: list[str] = field(default_factory=list)
    connect_timeout: int = 10

    def argv(self, host: str, command: str) -> list[str]:
        """The ssh argument list (no local shell involved)."""
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.port:
            cmd += ["-p", str(self.port)]
        for opt in self.options:
            cmd += ["-o", opt]
        return cmd + ["--", host, command]


def remote_command(words: list[str], remote_dir: str, env: dict[str, str], timeout: float) -> str:
    """``cd DIR && exec env K=V ... timeout T WORDS...``, every word quoted for the remote shell."""
    assign = [shlex.quote(f"{k}={v}") for k, v in env.items()]
    return " ".join(["cd", shlex.quote(remote_dir), "&&", "exec", "env", *assign, "timeout", str(int(timeout)),
                     *map(shlex.quote, words)])


def run_remote(ssh: SSH, host: str, command: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run over ssh; (parsed probe result, error text)."""
    proc = subprocess.Popen(ssh.argv(host, command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, f"no answer within {timeout:.0f} s"
    for line in reversed(out.splitlines()):
        if line.startswith(probe.MARKER):
            return json.loads(line[len(probe.MARKER):]), ""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if proc.returncode == 255:
        msg = lines[-1] if lines else "failed (exit 255)"
        return None, msg if msg.startswith("ssh:") else "ssh: " + msg
    return None, f"probe exited {proc.returncode}: " + (lines[-1] if lines else "no output")


def ds_env_vars(path: str | None) -> dict[str, str]:
    """The variables of the DeepSpeed env file the launch would use (``DS_ENV_FILE``, else
    ``~/.deepspeed_env`` then ``./.deepspeed_env``), so the check sees the job's environment."""
    paths = [path] if path else [os.path.join(os.path.expanduser("~"), os.environ.get("DS_ENV_FILE", ".deepspeed_env")),
                                 os.path.join(".", os.environ.get("DS_ENV_FILE", ".deepspeed_env"))]
    out: dict[str, str] = {}
    for p in paths:
        if p and os.path.isfile(p):
            with open(p) as f:
                for line in f:
                    if "=" in line:
                        k, v = line.rstrip("\n").split("=", 1)
                        out[k.strip()] = v.strip()
    return out


def evaluate(entries: list[tuple[str, int]], results: dict[str, tuple[dict[str, Any] | None, str]],
             local_rev: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per host: what was found and the problems (empty: ok). Pure: unit-tested."""
    rows = []
    versions: dict[str, set[str]] = {"torch": set(), "deepspeed": set()}
    for host, slots in entries:
        res, err = results.get(host, (None, "not visited"))
        row: dict[str, Any] = {"host": host, "slots": slots, "problems": [], "notes": []}
        rows.append(row)
        if res is None:
            row.update(ssh="FAIL" if err.startswith("ssh") else "?" if err.startswith("no answer") else "ok",
                       problems=[err])
            continue
        row["ssh"] = "ok"
        rev = res["revision"]
        row["revision"] = rev.get("git") or rev["source"]
        if rev["source"] != local_rev["source"] or rev.get("git") != local_rev.get("git"):
            row["problems"].append(f"code differs from this host's (git {rev.get('git')} vs {local_rev.get('git')}, "
                                   f"sources {rev['source']} vs {local_rev['source']})")
        imports = res["imports"]
        bad = [f"{m}: {v['error']}" for m, v in imports.items() if not v["ok"]]
        row["problems"] += [f"import {b}" for b in bad]
        row["imports"] = ", ".join(f"{m} {v['version']}" for m, v in imports.items() if v["ok"])
        for m in versions:
            if imports.get(m, {}).get("ok"):
                versions[m].add(imports[m]["version"])
        gpus = res.get("gpus")
        row["gpus"] = gpus
        if gpus is None:
            row["gpu_text"] = "?"
        elif gpus == 0:
            row["gpu_text"] = "0 (CPU only)"
            row["notes"].append("no GPU visible: ranks run on CPU")
        else:
            names = sorted(set(res.get("gpu_names", [])))
            row["gpu_text"] = f"{gpus} x {names[0] if len(names) == 1 else '/'.join(names)}"
            if gpus < slots:
                row["problems"].append(f"slots={slots} but only {gpus} GPUs visible")
    for m, seen in versions.items():
        if len(seen) > 1:
            for row in rows:
                if "imports" in row:
                    row["problems"].append(f"{m} versions differ across hosts: {', '.join(sorted(seen))}")
    return rows


def table(rows: list[dict[str, Any]], allreduce: dict[str, Any]) -> str:
    """The human report."""
    head = ["HOST", "SLOTS", "SSH", "REVISION", "IMPORTS", "GPUS", "RESULT"]
    body = []
    for r in rows:
        result = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        if r["notes"] and not r["problems"]:
            result += f" ({'; '.join(r['notes'])})"
        body.append([r["host"], str(r["slots"]), r.get("ssh", "-"), r.get("revision", "-"), r.get("imports", "-"),
                     r.get("gpu_text", "-"), result])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in [head, *body]]
    lines.append("")
    lines.append("all-reduce: " + allreduce["text"])
    return "\n".join(lines)


def all_reduce(entries: list[tuple[str, int]], ssh: SSH, args: argparse.Namespace, env: dict[str, str],
               backend: str) -> dict[str, Any]:
    """One rank per host, all at once; the bandwidth rank 0 measured, or who failed."""
    world = len(entries)
    addr = args.master_addr or entries[0][0]
    port = args.master_port or random.randint(31000, 31999)
    py, rdir = args.remote_python, args.remote_dir

    def one(i: int) -> tuple[dict[str, Any] | None, str]:
        words = [py, os.path.join(rdir, PROBE), "allreduce", "--rank", str(i), "--world", str(world),
                 "--master-addr", addr, "--master-port", str(port), "--backend", backend, "--size-mb",
                 str(args.size_mb), "--timeout", str(args.timeout)]
        return run_remote(ssh, entries[i][0], remote_command(words, rdir, env, args.timeout + 10), args.timeout + 20)

    with ThreadPoolExecutor(max_workers=min(64, world)) as pool:
        results = list(pool.map(one, range(world)))
    failed = []
    for (host, _), (res, err) in zip(entries, results):
        if res is None or not res.get("ok"):
            failed.append(f"{host}: {err or (res or {}).get('error', '?')}")
    out: dict[str, Any] = {"backend": backend, "hosts": world, "master": f"{addr}:{port}", "size_mb": args.size_mb,
                           "ok": not failed, "failed": failed, "per_rank": [r for r, _ in results]}
    if failed:
        out["text"] = f"{backend}, {world} hosts via {addr}:{port}: FAIL: " + "; ".join(failed)
    else:
        r0 = results[0][0] or {}
        out.update(seconds=r0["seconds"], busbw_gbs=r0["busbw_gbs"], algbw_gbs=r0["algbw_gbs"])
        out["text"] = (f"{backend}, {world} hosts via {addr}:{port}, {args.size_mb:g} MiB: "
                       f"{1e3 * r0['seconds']:.1f} ms per all-reduce, bus bandwidth {r0['busbw_gbs']:.2f} GB/s: ok")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtp_ds.launch.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--hostfile", required=True)
    p.add_argument("--ssh-port", type=int, help="ssh port (default: ssh's own, usually 22)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ssh -o option (repeatable)")
    p.add_argument("--remote-python", default=sys.executable, help="python on the hosts (default: this one)")
    p.add_argument("--remote-dir", default=REPO, help="repository on the hosts (default: this one)")
    p.add_argument("--deepspeed-env", help="env file of the launch (default: DeepSpeed's lookup)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="all-reduce backend (auto: nccl when every host has GPUs)")
    p.add_argument("--master-addr", help="rank 0's address as the others reach it (default: first host)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: random in 31000-31999)")
    p.add_argument("--size-mb", type=float, default=8.0, help="all-reduce size (MiB)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per remote step")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries = read_hostfile(args.hostfile)
    except (HostfileError, OSError) as e:  # a bad hostname is a HostfileError here
        print(f"dtp_ds.launch.check: error: {e}", file=sys.stderr)
        return 2
    if any(not o or o.startswith("-") or "=" not in o for o in args.ssh_option):
        print("dtp_ds.launch.check: error: --ssh-option takes KEY=VALUE", file=sys.stderr)
        return 2
    ssh = SSH(args.ssh_port, list(args.ssh_option))
    env = ds_env_vars(args.deepspeed_env)
    local_rev = probe.revision(REPO)
    t0 = time.time()

    def visit(entry: tuple[str, int]) -> tuple[dict[str, Any] | None, str]:
        host, slots = entry
        words = [args.remote_python, os.path.join(args.remote_dir, PROBE), "info", "--slots", str(slots)]
        return run_remote(ssh, host, remote_command(words, args.remote_dir, env, args.timeout), args.timeout + 15)

    with ThreadPoolExecutor(max_workers=min(64, len(entries))) as pool:
        results = dict(zip((h for h, _ in entries), pool.map(visit, entries)))
    rows = evaluate(entries, results, local_rev)
    if all(not r["problems"] for r in rows):
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if all((r.get("gpus") or 0) > 0 for r in rows) else "gloo"
        ar = all_reduce(entries, ssh, args, env, backend)
    else:
        bad = [r["host"] for r in rows if r["problems"]]
        ar = {"ok": False, "skipped": True, "text": f"skipped: {', '.join(bad)} failed the checks above"}
    ok = all(not r["problems"] for r in rows) and ar["ok"]
    if args.json:
        print(json.dumps({"ok": ok, "hosts": rows, "allreduce": ar, "local_revision": local_rev,
                          "seconds": round(time.time() - t0, 1)}))
    else:
        print(f"pre-flight of {args.hostfile}: {len(entries)} hosts, {sum(s for _, s in entries)} slots, "
              f"local revision {local_rev.get('git') or '-'} (sources {local_rev['source']})\n")
        print(table(rows, ar))
        failed = [r["host"] for r in rows if r["problems"]]
        print("\nresult: " + ("ok" if ok else "FAILED" + (f" ({', '.join(failed)})" if failed else " (all-reduce)"))
              + f" in {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
