"""Scheduler allocations as (host, slots) lists: Slurm's compressed node lists and GPU
variables, and PBS node files.

Slurm node lists (``p0201``, ``p[0201-0203,0305]``, ``r[1-2]n[01-02]``, ``p[01-02]-ib``) are
expanded by Slurm itself (``scontrol show hostnames``) where it is installed, else by
python-hostlist; every expanded name must pass ``validate_hostname``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from dtp_ds.launch.hostnames import validate_hostname

MAX_HOSTS = 65536
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                 "SLURM_TRES_PER_NODE", "SLURM_GPUS")


class NodeListError(ValueError):
    """A node list or scheduler variable could not be read; the message says which rule."""


# python-hostlist's reasons for refusing a list, as this module's rules
_HOSTLIST_RULES = {
    "unbalanced brackets": "a '[' without a matching ']' or a ']' without a matching '['",
    "nested brackets": "nested '[' (Slurm bracket groups do not nest)",
    "start > stop": "a range runs backwards",
    "bad range": "a bracket entry is not N or N-M (digits only)",
    "range too large": f"it names more than {MAX_HOSTS} hosts",
    "results too large": f"it names more than {MAX_HOSTS} hosts",
}
# what is handed to scontrol: no option-like or shell-special text (the rest is refused below)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\],-]*")


def _scontrol_hostnames(text: str) -> list[str] | None:
    """Slurm's own expansion (``scontrol show hostnames``), or None where it is not available."""
    scontrol = shutil.which("scontrol")
    if scontrol is None or not _PLAIN.fullmatch(text):
        return None
    try:
        p = subprocess.run([scontrol, "show", "hostnames", text], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    # a refusal is explained by python-hostlist below, which names the rule
    return p.stdout.split() if p.returncode == 0 else None


def _hostlist_hostnames(text: str) -> list[str]:
    # imported here: on a Slurm login node scontrol alone is enough, with any python3
    import hostlist

    try:
        return hostlist.expand_hostlist(text, allow_duplicates=True)
    except hostlist.BadHostlist as e:
        rule = _HOSTLIST_RULES.get(str(e), str(e))
        raise NodeListError(f"node list '{text}': {rule}") from None


def expand_nodelist(text: str) -> list[str]:
    """Every host of a Slurm node list, in order, validated; duplicates are refused. Expanded by
    ``scontrol show hostnames`` where it exists, else by python-hostlist (the same syntax)."""
    if text is None or text.strip() == "":
        raise NodeListError("node list is empty")
    if re.search(r"^,|,,|,$", text):  # both expanders skip empty entries silently
        raise NodeListError(f"node list '{text}': empty entry (doubled, leading or trailing ',')")
    hosts = _scontrol_hostnames(text)
    if hosts is None:
        hosts = _hostlist_hostnames(text)
    if len(hosts) > MAX_HOSTS:
        raise NodeListError(f"node list '{text}': it names more than {MAX_HOSTS} hosts")
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
