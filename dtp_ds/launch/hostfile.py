"""DeepSpeed hostfiles (``host slots=N`` per line): read them strictly, and write them from a
scheduler allocation (``tools/make_hostfile``).

    tools/make_hostfile [--partition CLUSTER:PARTITION] [--out FILE]       # inside sbatch / qsub
    tools/make_hostfile --nodelist 'p[0201-0202]' --gpus-per-node 2 [--partition pitzer:gpuparallel-48core]

Nodes come from ``--nodelist`` (Slurm syntax), ``--pbs-nodefile``, ``SLURM_JOB_NODELIST`` or
``PBS_NODEFILE``, in that order; slots from ``--gpus-per-node``, the Slurm GPU variables, or the
PBS GPU / node file. Every refusal names its rule and exits 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence

from dtp_ds import IMPORT_ROOT
from dtp_ds.launch.envfile import EnvFileError, collect, parse_assignments, write_env
from dtp_ds.launch.hostnames import HostnameError, validate_hostname
from dtp_ds.launch.nodelist import (
    NodeListError,
    expand_nodelist,
    parse_pbs_nodefile,
    slurm_gpus_per_node,
    slurm_nodelist,
)

Entries = list[tuple[str, int]]
_LINE = re.compile(r"(\S+)\s+slots=(\S+)")


class HostfileError(ValueError):
    """A hostfile line or a job shape was refused; the message names the rule."""


def check_partition(entries: Sequence[tuple[str, int]], spec: str, registry_file: str | None = None) -> str:
    """Raise HostfileError when partition ``spec`` (CLUSTER:PARTITION of the autotuner's
    registry, ``dtp_ds/cluster/partitions.json``, or of ``registry_file``) refuses the job
    shape: nodes per job, GPUs per node (the largest slots), GPUs per job, node types. Returns
    the partition's label."""
    from pathlib import Path

    from dtp_ds.cluster import partitions as reg

    try:
        if registry_file:
            if spec.count(":") != 1:
                raise ValueError(f"--partition {spec}: expected CLUSTER:PARTITION")
            cluster, name = spec.split(":")
            part = reg.registry_partition(cluster.lower(), name, reg.load_registry(Path(registry_file)))
        else:
            part = reg.resolve_target(spec)
        reg.check_job_shape(part, len(entries), max(n for _, n in entries))
    except (ValueError, KeyError) as e:  # JobShapeError is a ValueError
        raise HostfileError(str(e).strip("'\"")) from None
    return part.label


def parse_hostfile(text: str, where: str = "hostfile") -> Entries:
    """(host, slots) pairs of a DeepSpeed hostfile; ``#`` comments and blank lines are skipped."""
    entries: Entries = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise HostfileError(f"{where}:{no}: '{raw.strip()}' is not 'HOST slots=N'")
        host, slots = m.group(1), m.group(2)
        try:
            validate_hostname(host)
        except HostnameError as e:
            raise HostfileError(f"{where}:{no}: {e}") from None
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{where}:{no}: slots={slots} is not a positive integer")
        if any(h == host for h, _ in entries):
            raise HostfileError(f"{where}:{no}: host {host} is listed twice")
        entries.append((host, int(slots)))
    if not entries:
        raise HostfileError(f"{where}: lists no hosts")
    return entries


def read_hostfile(path: str) -> Entries:
    """``parse_hostfile`` of a file."""
    with open(path) as f:
        return parse_hostfile(f.read(), path)


def format_hostfile(entries: Sequence[tuple[str, int]]) -> str:
    """The hostfile text; names are validated again on the way out."""
    for host, n in entries:
        validate_hostname(host)
        if int(n) < 1:
            raise HostfileError(f"{host}: slots={n} is not a positive integer")
    return "".join(f"{h} slots={int(n)}\n" for h, n in entries)


def allocation(nodelist: str | None = None, gpus_per_node: int | None = None, pbs_nodefile: str | None = None,
               env: Mapping[str, str] | None = None) -> tuple[Entries, str]:
    """(host, slots) of the allocation and a one-line account of where they came from."""
    env = os.environ if env is None else env
    if gpus_per_node is not None and gpus_per_node < 1:
        raise HostfileError(f"--gpus-per-node {gpus_per_node}: must be at least 1")
    pbs = pbs_nodefile if nodelist is None else None
    if nodelist is None and pbs is None:
        if env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"):
            nodelist, nodes_from = slurm_nodelist(env)
        elif env.get("PBS_NODEFILE"):
            pbs = env["PBS_NODEFILE"]
        else:
            raise HostfileError("no allocation: not inside a Slurm or PBS job (SLURM_JOB_NODELIST, PBS_NODEFILE "
                                "unset); give --nodelist STR --gpus-per-node N")
    else:
        nodes_from = "--nodelist" if nodelist is not None else "--pbs-nodefile"
    if nodelist is not None:
        hosts = expand_nodelist(nodelist)
        if gpus_per_node is None:
            gpus_per_node, slots_from = slurm_gpus_per_node(env, len(hosts))
        else:
            slots_from = "--gpus-per-node"
        return [(h, gpus_per_node) for h in hosts], f"nodes from {nodes_from}, slots from {slots_from}"
    assert pbs is not None
    with open(pbs) as f:
        text = f.read()
    gpufile = env.get("PBS_GPUFILE")
    gpu_text = None
    if gpus_per_node is None and gpufile and os.path.isfile(gpufile):
        with open(gpufile) as f:
            gpu_text = f.read()
    entries = parse_pbs_nodefile(text, gpu_text)
    if gpus_per_node is not None:
        return [(h, gpus_per_node) for h, _ in entries], f"nodes from {pbs}, slots from --gpus-per-node"
    how = "PBS_GPUFILE" if gpu_text is not None else "the node file's lines per host (mpiprocs)"
    return entries, f"nodes from {pbs}, slots from {how}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_hostfile", description="Write a DeepSpeed hostfile from the Slurm / PBS allocation.")
    p.add_argument("--nodelist", help="Slurm node list, e.g. 'p[0201-0203,0305]' (default: SLURM_JOB_NODELIST)")
    p.add_argument("--gpus-per-node", type=int, help="slots per host (default: from SLURM_GPUS_ON_NODE & co.)")
    p.add_argument("--pbs-nodefile", help="PBS node file (default: PBS_NODEFILE)")
    p.add_argument("--partition", help="CLUSTER:PARTITION whose limits the job shape must respect")
    p.add_argument("--partitions-file", help="partitions registry (default: dtp_ds/cluster/partitions.json)")
    p.add_argument("--out", help="hostfile to write (default: stdout)")
    p.add_argument("--deepspeed-env", metavar="FILE",
                   help="also write the env file every node gets (use it with DS_ENV_FILE=FILE): PYTHONPATH, "
                        "PATH, NCCL_*, WANDB_MODE, ... from this environment (dtp_ds/launch/envfile.py)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra variable for --deepspeed-env (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries, how = allocation(args.nodelist, args.gpus_per_node, args.pbs_nodefile)
        if args.partition:
            how += f", shape accepted by {check_partition(entries, args.partition, args.partitions_file)}"
        text = format_hostfile(entries)
        variables = collect(repo=IMPORT_ROOT, extra=parse_assignments(args.env)) if args.deepspeed_env else None
    except (HostfileError, HostnameError, NodeListError, EnvFileError, OSError) as e:
        print(f"make_hostfile: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    if variables is not None:
        write_env(args.deepspeed_env, variables)
        print(f"make_hostfile: {len(variables)} variables -> {args.deepspeed_env} "
              f"(launch with DS_ENV_FILE={os.path.abspath(args.deepspeed_env)})", file=sys.stderr)
    total = sum(n for _, n in entries)
    print(f"make_hostfile: {len(entries)} node{'s' if len(entries) > 1 else ''}, {total} slots ({how})"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
