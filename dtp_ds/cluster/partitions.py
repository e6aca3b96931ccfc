"""Cluster partitions: GPU types, node types and job-shape rules, read from ``partitions.json``.

A target is ``CLUSTER:PARTITION`` (``pitzer:gpuserial``), ``local`` (this machine, detected at
run time), or a bare GPU memory size (``80``, ``80GB``; also ``--gpu-mem 80``). The data live in
the JSON file, not here: each value there says whether it comes from the users' observations
(CONTEXT.md), OSC's public documentation, or is an assumption.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# Package data (read through importlib.resources, so an installed copy reads its own).
REGISTRY_RESOURCE = "partitions.json"
GiB = 2**30


class JobShapeError(ValueError):
    """A job shape the partition refuses; the message names the rule and the nearest allowed shape."""


@dataclass(frozen=True)
class GpuType:
    name: str
    mem_gib: float
    bf16: bool
    tflops_16bit: float
    tflops_fp32: float
    hbm_gbps: float
    is_cpu: bool = False


@dataclass(frozen=True)
class NodeType:
    name: str
    gpu: GpuType
    gpus: int
    cores: int
    ram_gib: float
    interconnect_gbps: float  # between the GPUs of one node
    nodes: int | None  # how many of these one job can get (None: no limit known)


@dataclass(frozen=True)
class Partition:
    cluster: str
    name: str
    node_types: tuple[NodeType, ...]
    max_nodes_per_job: int | None = None
    max_gpus_per_node: int | None = None
    max_gpus_per_job: int | None = None
    inter_node_gbps: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return f"{self.cluster}:{self.name}" if self.cluster else self.name

    def usable_node_types(self, gpus_per_node: int) -> list[NodeType]:
        """Node types a job with ``gpus_per_node`` GPUs per node can land on."""
        return [n for n in self.node_types if n.gpus >= gpus_per_node]


def load_registry(path: Path | None = None) -> dict[str, Any]:
    """The partitions registry: ``path``, else the shipped ``dtp_ds/cluster/partitions.json``."""
    if path is None:
        return json.loads(resources.files(__package__).joinpath(REGISTRY_RESOURCE).read_text())
    with open(path) as f:
        return json.load(f)


def _gpu(reg: dict[str, Any], name: str) -> GpuType:
    g = reg["gpu_types"][name]
    return GpuType(name, g["gpu_mem_gib"], g["bf16"], g["tflops_16bit"], g["tflops_fp32"], g["hbm_gbps"])


def list_partitions(reg: dict[str, Any] | None = None) -> list[str]:
    """Every ``CLUSTER:PARTITION`` in the registry, plus ``local``."""
    reg = reg or load_registry()
    out = [f"{c}:{p}" for c, cl in reg["clusters"].items() for p in cl.get("partitions", {})]
    return out + ["local"]


def registry_partition(cluster: str, name: str, reg: dict[str, Any] | None = None) -> Partition:
    reg = reg or load_registry()
    cl = reg["clusters"].get(cluster)
    if cl is None or name not in cl.get("partitions", {}):
        raise ValueError(f"unknown partition '{cluster}:{name}'; known: {', '.join(list_partitions(reg))}, "
                         f"or a GPU memory size such as 80GB")
    p = cl["partitions"][name]
    types = []
    for tname, avail in p["node_types"].items():
        t = cl["node_types"][tname]
        types.append(NodeType(tname, _gpu(reg, t["gpu"]), t["gpus"], t["cores"], t["ram_gib"],
                              t["interconnect_gbps"], avail.get("nodes")))
    notes = tuple(v for k, v in p.items() if k.startswith("_"))
    return Partition(cluster, name, tuple(types), p.get("max_nodes_per_job"), p.get("max_gpus_per_node"),
                     p.get("max_gpus_per_job"), p.get("inter_node_gbps"), notes)


def memory_partition(mem_gib: float, bf16: bool | None = None) -> Partition:
    """A bare GPU memory size: one GPU type, no job-shape limits.

    bf16 is assumed unless the size is a V100's (16 or 32 GB), the common GPUs without it;
    pass ``--precision fp16`` to tune for another GPU without bf16."""
    if bf16 is None:
        bf16 = round(mem_gib) not in (16, 32)
    # Peak 16-bit TFLOP/s guessed from the memory size (V100 / A100 / H100 class): it only
    # ranks candidates by speed, never decides what fits.
    tflops = 125.0 if mem_gib <= 32 else 312.0 if mem_gib <= 80 else 989.0
    gpu = GpuType(f"{mem_gib:g}GB GPU", float(mem_gib), bf16, tflops, tflops / 8, 2000.0)
    node = NodeType("generic", gpu, 8, 64, 512.0, 150.0, None)
    return Partition("", f"{mem_gib:g}GB", (node,), None, None, None, 25.0,
                     ("bare memory size: 8 GPUs and 64 cores per node and 512 GB RAM assumed",))


def local_partition() -> Partition:
    """This machine: its CUDA GPUs if torch sees any, else its CPU (memory = RAM)."""
    import torch

    cores = os.cpu_count() or 1
    ram = _ram_gib()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = GpuType(props.name, props.total_memory / GiB, torch.cuda.is_bf16_supported(), 100.0, 15.0, 1000.0)
        node = NodeType("local", gpu, torch.cuda.device_count(), cores, ram, 50.0, 1)
    else:
        # CPU "device": DeepSpeed's CPU accelerator trains in fp32/bf16; memory is the RAM.
        gpu = GpuType("cpu", ram, True, 0.05 * cores, 0.05 * cores, 20.0, is_cpu=True)
        node = NodeType("local", gpu, 1, cores, ram, 10.0, 1)
    return Partition("", "local", (node,), 1, node.gpus, None, None, ("detected at run time",))


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return 16.0


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*$", re.IGNORECASE)


def resolve_target(spec: str | None, gpu_mem: float | None = None) -> Partition:
    """``CLUSTER:PARTITION``, ``local``, a memory size (``80``, ``80GB``), or ``--gpu-mem``."""
    if gpu_mem is not None:
        if spec:
            raise ValueError("give --partition or --gpu-mem, not both")
        return memory_partition(gpu_mem)
    if not spec:
        raise ValueError("give --partition CLUSTER:PARTITION (or local, or a memory size) or --gpu-mem GB")
    m = _MEM_RE.match(spec)
    if m:
        return memory_partition(float(m.group(1)))
    if spec == "local":
        return local_partition()
    if ":" not in spec:
        raise ValueError(f"--partition {spec}: expected CLUSTER:PARTITION (known: {', '.join(list_partitions())}), "
                         f"local, or a memory size such as 80GB")
    cluster, name = spec.split(":", 1)
    return registry_partition(cluster.lower(), name)


def shape_refusal(part: Partition, nodes: int, gpus_per_node: int) -> str | None:
    """Why the partition refuses ``nodes`` x ``gpus_per_node``, or None if it accepts it."""
    if nodes < 1 or gpus_per_node < 1:
        return "nodes and GPUs per node must be >= 1"
    if part.max_gpus_per_job is not None and nodes * gpus_per_node > part.max_gpus_per_job:
        return f"max_gpus_per_job: {nodes * gpus_per_node} GPUs exceeds the limit of {part.max_gpus_per_job} per job"
    if part.max_nodes_per_job is not None and nodes > part.max_nodes_per_job:
        return f"max_nodes_per_job: at most {part.max_nodes_per_job} node(s) per job"
    if part.max_gpus_per_node is not None and gpus_per_node > part.max_gpus_per_node:
        return f"max_gpus_per_node: its nodes have at most {part.max_gpus_per_node} GPUs"
    usable = part.usable_node_types(gpus_per_node)
    if not usable:
        return f"no node type has {gpus_per_node} GPUs"
    if all(n.nodes is not None for n in usable):
        avail = sum(n.nodes for n in usable)  # type: ignore[misc]
        if nodes > avail:
            kinds = ", ".join(f"{n.name} ({n.nodes})" for n in usable)
            return f"node count: only {avail} node(s) with >= {gpus_per_node} GPUs can join one job [{kinds}]"
    return None


def nearest_allowed(part: Partition, nodes: int, gpus_per_node: int) -> tuple[int, int] | None:
    """The accepted shape closest to the request: same GPU count first, then fewer GPUs
    rather than more, then the closest GPUs per node and node count."""
    max_g = part.max_gpus_per_node or max(n.gpus for n in part.node_types)
    max_n = part.max_nodes_per_job or max(nodes, 1) * 4
    want = nodes * gpus_per_node
    best, best_key = None, None
    for n in range(1, max_n + 1):
        for g in range(1, max_g + 1):
            if shape_refusal(part, n, g) is not None:
                continue
            total = n * g
            key = (abs(total - want), total > want, abs(g - gpus_per_node), abs(n - nodes))
            if best_key is None or key < best_key:
                best, best_key = (n, g), key
    return best


def check_job_shape(part: Partition, nodes: int, gpus_per_node: int) -> list[NodeType]:
    """The node types the job can land on; raises :class:`JobShapeError` for a refused shape."""
    why = shape_refusal(part, nodes, gpus_per_node)
    if why is None:
        return part.usable_node_types(gpus_per_node)
    near = nearest_allowed(part, nodes, gpus_per_node)
    hint = (f" Nearest allowed shape: --nodes {near[0]} --gpus-per-node {near[1]}"
            f" ({near[0] * near[1]} GPUs)." if near else "")
    raise JobShapeError(f"{part.label} refuses {nodes} node(s) x {gpus_per_node} GPU(s): {why}.{hint}")
