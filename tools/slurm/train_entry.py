"""``dtp_ds.train`` as a script file, with rank discovery first (``dtp_ds.launch.discovery``).

For launchers that run a file rather than a module (``deepspeed --launcher slurm`` drops
``--module``) and for plain ``srun`` / ``mpirun``, which set SLURM_PROCID or the MPI rank
variables instead of RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:

    srun python tools/slurm/train_entry.py --deepspeed_config ... --model ...
    mpirun -np 8 -hostfile H -x MASTER_ADDR -x MASTER_PORT python tools/slurm/train_entry.py ...
"""
import sys
from pathlib import Path

# the repository root, not this folder, leads the import path
sys.path[0] = str(Path(__file__).resolve().parents[2])

from dtp_ds.launch.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dtp_ds.train", *sys.argv[1:]]))
