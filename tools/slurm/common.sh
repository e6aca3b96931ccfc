#!/usr/bin/env bash
# Shared body of the batch scripts in tools/slurm/ (sourced by them, after they set the variables
# below). Inside the allocation it: writes the hostfile and the env file every node gets
# (tools/make_hostfile, checked against the partition), runs the pre-flight check
# (python -m dtp_ds.launch.check), then launches dtp_ds.train. Submit from the repository root:
#
#   sbatch -A PROJECT tools/slurm/pitzer_vit_b_32.sbatch [extra dtp_ds.train flags]
#
# Set by the batch script (or exported before sbatch; defaults in brackets):
#   MODEL, DS_CONFIG             model name and DeepSpeed config (required)
#   TRAIN_DATA                   shards, e.g. '/fs/scratch/laion/{00000..01999}.tar' (required)
#   PARTITION                    CLUSTER:PARTITION the job shape is checked against [none]
#   PRECISION, EPOCHS, LR, WARMUP, BATCH_SIZE, ZEROSHOT_DATA   optional dtp_ds.train flags
#   NAME [$SLURM_JOB_NAME], LOGS [$REPO/logs]: the run goes to LOGS/NAME (resumed if it exists)
#   LAUNCHER [pdsh]              pdsh | slurm | openmpi | mpirun | srun | torchrun (see README)
#   GPUS_PER_NODE                ranks per node [from SLURM_GPUS_ON_NODE & co.]
#   MASTER_ADDR [first host], MASTER_PORT [20000 + job id % 20000]
#   PREFLIGHT [1]                0 skips the pre-flight check
#   DRY_RUN [0]                  1 prints the launch command instead of running it
#   VENV [$REPO/.venv]           virtualenv (same path on every node: shared filesystem; not activated)
set -euo pipefail

REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO"
[ -f "$REPO/dtp_ds/launch/check.py" ] || { echo "common.sh: $REPO is not the dtp_ds repository (submit from its root or set REPO)" >&2; exit 2; }
VENV="${VENV:-$REPO/.venv}"
# The venv's programs by absolute path, without activating it. (Which ninja JIT-builds DeepSpeed's
# ops no longer depends on PATH: import dtp_ds puts the interpreter's own first, on every node.)
PYTHON="${PYTHON:-$VENV/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
DEEPSPEED="$(dirname "$PYTHON")/deepspeed"

: "${MODEL:?set MODEL}" "${DS_CONFIG:?set DS_CONFIG}" "${TRAIN_DATA:?set TRAIN_DATA (shards, e.g. DIR/{00000..00099}.tar)}"
JOB_ID="${SLURM_JOB_ID:-$$}"
NAME="${NAME:-${SLURM_JOB_NAME:-dtp_ds}-$JOB_ID}"
LOGS="${LOGS:-$REPO/logs}"
LAUNCHER="${LAUNCHER:-pdsh}"
LAUNCH_DIR="${LAUNCH_DIR:-$LOGS/.launch/$JOB_ID}"   # not inside LOGS/NAME: the run owns that
mkdir -p "$LAUNCH_DIR"
HOSTFILE="$LAUNCH_DIR/hostfile"
export DS_ENV_FILE="$LAUNCH_DIR/deepspeed_env"            # DeepSpeed's runner reads this (absolute) file

# 1. hostfile + env file (refused shapes and hostile names stop the job here, exit 2)
mh_args=(--out "$HOSTFILE" --deepspeed-env "$DS_ENV_FILE")
[ -n "${PARTITION:-}" ] && mh_args+=(--partition "$PARTITION")
[ -n "${GPUS_PER_NODE:-}" ] && mh_args+=(--gpus-per-node "$GPUS_PER_NODE")
[ -n "${NODELIST:-}" ] && mh_args+=(--nodelist "$NODELIST")
FIRST_HOST="$("$PYTHON" "$REPO/tools/make_hostfile" "${mh_args[@]}" >/dev/null && awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")"
MASTER_ADDR="${MASTER_ADDR:-$FIRST_HOST}"
MASTER_PORT="${MASTER_PORT:-$((20000 + ${JOB_ID//[^0-9]/} % 20000))}"
NNODES="$(grep -cv '^#' "$HOSTFILE")"
RANKS="$(awk -F'slots=' '!/^#/ && NF>1 {s += $2} END {print s}' "$HOSTFILE")"
case "$LAUNCHER" in
    slurm|openmpi|mpirun|srun)  # no per-rank launcher sets MASTER_*: ship them with the env file
        printf 'MASTER_ADDR=%s\nMASTER_PORT=%s\n' "$MASTER_ADDR" "$MASTER_PORT" >> "$DS_ENV_FILE" ;;
esac
echo "common.sh: $NNODES nodes, $RANKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER, run $LOGS/$NAME" >&2

# 2. pre-flight: ssh, same revision, imports, GPUs, an all-reduce across all hosts
if [ "${PREFLIGHT:-1}" != 0 ] && [ "${DRY_RUN:-0}" != 1 ]; then
    "$PYTHON" -m dtp_ds.launch.check --hostfile "$HOSTFILE" --deepspeed-env "$DS_ENV_FILE" \
        || { echo "common.sh: pre-flight failed: not launching" >&2; exit 1; }
fi

# 3. the training command
# pdsh runs it through every node's shell, and DeepSpeed's pdsh runner only wraps arguments that
# hold a space in double quotes (inside which $ and ` still run): each argument with anything a
# shell interprets ({a..b}, globs, $, ;, ...) is single-quoted once for that shell, and one that
# cannot be (a quote or whitespace in it) is refused.
pdsh_word() {
    case "$1" in
        *[!A-Za-z0-9_./:=,+@%-]*) ;;
        *) printf '%s' "$1"; return 0 ;;
    esac
    case "$1" in
        *"'"*|*[[:space:]]*) echo "common.sh: argument '$1' cannot cross pdsh's remote shell (it holds a quote or whitespace): rename it, or use another LAUNCHER" >&2
                             return 1 ;;
    esac
    printf "'%s'" "$1"
}
train_args=(--deepspeed_config "$DS_CONFIG" --model "$MODEL" --train-data "$TRAIN_DATA" --logs "$LOGS"
            --name "$NAME" --resume latest)
[ -n "${PRECISION:-}" ] && train_args+=(--precision "$PRECISION")
[ -n "${EPOCHS:-}" ] && train_args+=(--epochs "$EPOCHS")
[ -n "${LR:-}" ] && train_args+=(--lr "$LR")
[ -n "${WARMUP:-}" ] && train_args+=(--warmup "$WARMUP")
[ -n "${BATCH_SIZE:-}" ] && train_args+=(--batch-size "$BATCH_SIZE")
[ -n "${ZEROSHOT_DATA:-}" ] && train_args+=(--zeroshot-data "$ZEROSHOT_DATA")
train_args+=("$@")
if [ "$LAUNCHER" = pdsh ]; then
    quoted=()
    for a in "${train_args[@]}"; do w="$(pdsh_word "$a")" || exit 2; quoted+=("$w"); done
    train_args=("${quoted[@]}")
fi
ENTRY="$REPO/tools/slurm/train_entry.py"   # dtp_ds.train with rank discovery, as a file
GPN=$((RANKS / NNODES))

case "$LAUNCHER" in
    pdsh)      cmd=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
                    --module dtp_ds.train "${train_args[@]}") ;;
    slurm)     cmd=("$DEEPSPEED" --hostfile "$HOSTFILE" --launcher slurm --master_addr "$MASTER_ADDR"
                    --master_port "$MASTER_PORT" "$ENTRY" "${train_args[@]}") ;;
    openmpi)   cmd=("$DEEPSPEED" --hostfile "$HOSTFILE" --launcher openmpi --launcher_args "--bind-to none"
                    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$ENTRY" "${train_args[@]}") ;;
    mpirun)    mpi_env=(); while IFS='=' read -r k _; do mpi_env+=(-x "$k"); done < "$DS_ENV_FILE"
               set -a; source "$DS_ENV_FILE"; set +a
               cmd=(mpirun -np "$RANKS" -hostfile "$HOSTFILE" --bind-to none "${mpi_env[@]}"
                    "$PYTHON" -u "$ENTRY" "${train_args[@]}") ;;
    srun)      set -a; source "$DS_ENV_FILE"; set +a
               cmd=(srun --ntasks="$RANKS" --ntasks-per-node="$GPN" --kill-on-bad-exit=1
                    "$PYTHON" -u "$ENTRY" "${train_args[@]}") ;;
    torchrun)  set -a; source "$DS_ENV_FILE"; set +a
               cmd=(srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
                    "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPN"
                    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" -m dtp_ds.train "${train_args[@]}") ;;
    *)         echo "common.sh: LAUNCHER=$LAUNCHER: expected pdsh, slurm, openmpi, mpirun, srun or torchrun" >&2; exit 2 ;;
esac

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
echo "common.sh: $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
