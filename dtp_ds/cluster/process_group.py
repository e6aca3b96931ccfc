"""The process group, and the shared memory DeepSpeed's CPU all-reduce leaves behind.

On CPU, DeepSpeed's TorchBackend maps one ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
<port>_<rank>`` segment per rank (~69 MB) for its shared-memory all-reduce and never unlinks it:
every run on a new port leaves one per rank in ``/dev/shm`` (a RAM-backed tmpfs) until the machine
runs out of memory (we found 16 GB of them after a day of test suites). Once every rank has mapped
every peer's segment (``shm_initialize`` returns only then, and a barrier tells all ranks), the
names can go: the mappings live on and the kernel frees the memory when the last process exits,
killed or not.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def shm_allreduce_segment(rank: int) -> Path:
    """This rank's DeepSpeed CPU all-reduce segment (named as deepspeed's ``shm.cpp`` names it)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def use_interpreter_ninja() -> str | None:
    """Put the ``ninja`` installed beside this interpreter first on ``PATH`` (returned, or ``None``
    where there is none).

    torch JIT-builds DeepSpeed's CPU collective with whichever ``ninja`` ``PATH`` finds, and two
    ninja versions (the venv's pip wheel, the system's) hash build commands differently: each
    takes the other's build for stale and rebuilds it, a minute or more inside every
    ``init_distributed`` whenever processes started with different ``PATH``s (a shell, a launcher,
    ssh) take turns. One ninja for every rank of every job, whoever started it."""
    here = os.path.dirname(sys.executable)
    ninja = shutil.which("ninja", path=here)
    if ninja is None:
        return None
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, path]) if path else here
    return ninja


def init_process_group(timeout_minutes: float = 30.0, auto_mpi_discovery: bool = True, **kwargs) -> None:
    """``deepspeed.init_distributed``, then unlink this rank's shared-memory all-reduce segment
    once every peer has mapped it (see the module doc)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(auto_mpi_discovery=auto_mpi_discovery, timeout=timedelta(minutes=timeout_minutes),
                               **kwargs)
    segment = shm_allreduce_segment(dist.get_rank())
    if not segment.exists():
        return  # a GPU backend, or no shared-memory all-reduce on this machine
    dist.barrier()  # every rank is past shm_initialize: every segment is mapped by every peer
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
    log.debug("unlinked %s (mapped by every rank)", segment)
