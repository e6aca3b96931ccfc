"""``dtp_ds.train`` as a script file, for launchers that run a file rather than a module
(``deepspeed --launcher slurm`` drops ``--module``):

    deepspeed --hostfile H --launcher slurm tools/slurm/train_entry.py --deepspeed_config ... --model ...

``dtp_ds.train`` takes its ranks from the launcher, MPI or Slurm itself
(``dtp_ds.launch.discovery``), so plain ``srun`` / ``mpirun`` can run this file or
``python -m dtp_ds.train`` alike.
"""
import runpy
import sys
from pathlib import Path

# the repository root, not this folder, leads the import path
sys.path[0] = str(Path(__file__).resolve().parents[2])

if __name__ == "__main__":
    runpy.run_module("dtp_ds.train", run_name="__main__", alter_sys=True)
