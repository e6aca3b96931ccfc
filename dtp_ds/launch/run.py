"""Run a module under any launcher after rank discovery (``dtp_ds.launch.discovery``):

    mpirun -n 8 python -m dtp_ds.launch.run dtp_ds.train --deepspeed_config ... --model ...
    srun python -m dtp_ds.launch.run dtp_ds.train ...

MASTER_ADDR / MASTER_PORT already in the environment are kept (DeepSpeed's own MPI discovery
replaces them with ``hostname -I``'s first address and port 29500).
"""
from __future__ import annotations

import runpy
import sys

from dtp_ds.launch.discovery import DiscoveryError, discover


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    try:
        source = discover()
    except DiscoveryError as e:
        print(f"dtp_ds.launch.run: error: {e}", file=sys.stderr)
        return 2
    print(f"dtp_ds.launch.run: ranks from {source}", file=sys.stderr, flush=True)
    module, sys.argv = argv[0], argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
