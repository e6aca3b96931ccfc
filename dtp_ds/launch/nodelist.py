"""Scheduler allocations as (host, slots) lists: Slurm's compressed node lists and GPU
variables, and PBS node files.

Slurm node lists: ``p0201``, ``p[0201-0203,0305]``, ``p[01-02],q07``, several bracket
groups in one name (``r[1-2]n[01-02]``: the Cartesian product, leftmost slowest), zero padding
(the width of a range's lower bound: ``[08-11]`` -> 08 09 10 11, ``[8-11]`` -> 8 9 10 11), and
text after a group (``p[01-02]-ib``). Every expanded name must pass ``validate_hostname``.
"""
from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping

from dtp_ds.launch.hostnames import validate_hostname

MAX_HOSTS = 65536
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                 "SLURM_TRES_PER_NODE", "SLURM_GPUS")


class NodeListError(ValueError):
    """A node list or scheduler variable could not be read; the message says which rule."""


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets; refuse unbalanced or nested brackets."""
    items, depth, cur = [], 0, []
    for c in text:
        if c == "[":
            if depth:
                raise NodeListError(f"node list '{text}': nested '[' (Slurm bracket groups do not nest)")
            depth = 1
        elif c == "]":
            if not depth:
                raise NodeListError(f"node list '{text}': ']' without a matching '['")
            depth = 0
        if c == "," and not depth:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if depth:
        raise NodeListError(f"node list '{text}': '[' without a matching ']'")
    items.append("".join(cur))
    return items


def _expand_group(body: str, where: str) -> list[str]:
    """``0201-0203,0305`` -> ['0201', '0202', '0203', '0305']."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise NodeListError(f"node list '{where}': bracket entry '{part}' is not N or N-M (digits only)")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise NodeListError(f"node list '{where}': range '{part}' runs backwards")
        if b - a + 1 > MAX_HOSTS:
            raise NodeListError(f"node list '{where}': range '{part}' names more than {MAX_HOSTS} hosts")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(a, b + 1))
    return out


def _expand_item(item: str, where: str) -> list[str]:
    if item == "":
        raise NodeListError(f"node list '{where}': empty entry (doubled, leading or trailing ',')")
    pieces = re.split(r"(\[[^\]]*\])", item)
    choices: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(_expand_group(piece[1:-1], where))
        elif piece:
            choices.append([piece])
    count = 1
    for c in choices:
        count *= len(c)
    if count > MAX_HOSTS:
        raise NodeListError(f"node list '{where}': '{item}' names more than {MAX_HOSTS} hosts")
    return ["".join(p) for p in itertools.product(*choices)]


def expand_nodelist(text: str) -> list[str]:
    """Every host of a Slurm node list, in order, validated; duplicates are refused."""
    if text is None or text.strip() == "":
        raise NodeListError("node list is empty")
    hosts: list[str] = []
    for item in _split_top(text):
        hosts.extend(_expand_item(item, text))
    for h in hosts:
        validate_hostname(h)
    dup = sorted({h for h in hosts if hosts.count(h) > 1}) if len(hosts) < 5000 else []
    if len(set(hosts)) != len(hosts):
        raise NodeListError(f"node list '{text}': host{'s' if len(dup) > 1 else ''} "
                            f"{', '.join(dup) or '(several)'} listed more than once")
    return hosts


def _count(value: str, name: str) -> int:
    """A GPU count in Slurm's spellings: ``2``, ``v100:2``, ``gpu:v100:2``, ``gres/gpu:2``,
    ``gres/gpu:a100=2``, several comma-separated types (summed)."""
    total = 0
    for part in value.split(","):
        part = part.strip()
        if part.startswith("gres/") or part.startswith("gres:"):
            part = part[5:]
        m = re.fullmatch(r"(?:[\w.-]+[:=])*(\d+)(?:\(.*\))?", part)
        if m is None:
            raise NodeListError(f"{name}='{value}': cannot read a GPU count from '{part}'")
        total += int(m.group(1))
    return total


def _count_indices(value: str, name: str) -> int:
    """``0,1,2,3`` or ``0-3`` -> 4."""
    n = 0
    for part in value.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise NodeListError(f"{name}='{value}': '{part}' is not a GPU index or index range")
        n += 1 if m.group(2) is None else int(m.group(2)) - int(m.group(1)) + 1
    return n


def slurm_gpus_per_node(env: Mapping[str, str] | None = None, num_nodes: int | None = None) -> tuple[int, str]:
    """GPUs per node from the Slurm environment, and the variable it came from.

    Looks at SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS / SLURM_STEP_GPUS (index
    lists), SLURM_TRES_PER_NODE (``gres/gpu:N``) and SLURM_GPUS (the job total, divided by
    ``num_nodes``), in that order."""
    env = os.environ if env is None else env
    for name in GPU_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        if name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
            n = _count_indices(value, name)
        elif name == "SLURM_TRES_PER_NODE":
            gpu_parts = [p for p in value.split(",") if "gpu" in p]
            if not gpu_parts:
                continue
            n = _count(",".join(gpu_parts), name)
        else:
            n = _count(value, name)
        if name == "SLURM_GPUS":
            if not num_nodes:
                continue
            if n % num_nodes:
                raise NodeListError(f"SLURM_GPUS={value} does not divide evenly over {num_nodes} nodes: "
                                    f"pass --gpus-per-node")
            n //= num_nodes
        if n <= 0:
            raise NodeListError(f"{name}={value}: no GPUs on the node; pass --gpus-per-node N to run N ranks "
                                f"per node anyway (e.g. on CPU)")
        return n, name
    raise NodeListError(f"no GPU count in the Slurm environment (none of {', '.join(GPU_VARIABLES)} is set): "
                        f"request GPUs (--gpus-per-node) or pass --gpus-per-node N")


def slurm_nodelist(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The job's compressed node list and the variable it came from."""
    env = os.environ if env is None else env
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return env[name], name
    raise NodeListError("SLURM_JOB_NODELIST is not set (not inside a Slurm allocation)")


def parse_pbs_nodefile(text: str, gpufile: str | None = None) -> list[tuple[str, int]]:
    """Hosts of a PBS node file in first-seen order with their line counts as slots; with the
    text of a PBS GPU file (``host-gpuN`` lines) the slots are its GPUs per host instead."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        host = line.strip()
        if not host or host.startswith("#"):
            continue
        validate_hostname(host)
        counts[host] = counts.get(host, 0) + 1
    if not counts:
        raise NodeListError("PBS node file lists no hosts")
    if gpufile is not None:
        gpus: dict[str, int] = {}
        for line in gpufile.splitlines():
            line = line.strip()
            if not line:
                continue
            m = re.fullmatch(r"(.+)-gpu\d+", line)
            if m is None:
                raise NodeListError(f"PBS GPU file line '{line}' is not HOST-gpuN")
            gpus[m.group(1)] = gpus.get(m.group(1), 0) + 1
        missing = [h for h in counts if h not in gpus]
        if missing:
            raise NodeListError(f"PBS GPU file lists no GPU on {', '.join(missing)}")
        return [(h, gpus[h]) for h in counts]
    return list(counts.items())
