#!/usr/bin/env bash
# The shared launcher of the slurm/*.sh scripts: runs in the batch step of the allocation, checks the
# command line once, then starts the ranks with srun and passes every argument on to
# scale/pretrain.py (`sbatch slurm/vit_h_300ep.sh --run.name=h1 --data.source=...`). docs/slurm.md.
#
# Environment (all optional; site settings such as partition, account, qos, time or constraint are
# sbatch options: `sbatch -p gpu -A proj --qos=high slurm/vit_b_300ep.sh`):
#   SCALE_LAUNCH     srun (default): srun starts one task per GPU, no launcher in between, so
#                    signals reach every rank; torchrun: srun starts one torchrun per node (c10d
#                    rendezvous on the first node), which starts one worker per GPU
#   SCALE_GPUS_PER_NODE  torchrun's workers per node (default: the job's --ntasks-per-node)
#   SCALE_ROOT       the checkout (default: the folder sbatch was called from)
#   SCALE_PYTHON     the Python (default: $SCALE_ROOT/.venv/bin/python if there, else python3)
#   SCALE_SRUN_ARGS  extra srun options, e.g. a container: "--container-image=nvcr.io#nvidia/pytorch:25.01-py3"
#   MASTER_PORT      default 20000 + job id % 20000 (the same after a requeue)
#   SCALE_ENTRY      the module to run (default scale.pretrain; slurm/finetune.sh: scale.finetune;
#                    slurm/linear_probe.sh: scale.linear_probe)
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm/launch.sh runs inside a SLURM job: sbatch slurm/vit_b_300ep.sh [--section.field=value ...]" >&2
  exit 2
fi
root=${SCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
py=${SCALE_PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
mode=${SCALE_LAUNCH:-srun}
entry=${SCALE_ENTRY:-scale.pretrain}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
cd "$root"

echo "scale: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $nodes node(s), ${SLURM_NTASKS:-?} task(s)," \
  "launch $mode, rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"
# A wrong recipe, key, value, data path or DeepSpeed config (a probe's argument, checkpoint or output
# folder) fails here, once, before any rank starts.
case "$entry" in scale.pretrain | scale.finetune | scale.linear_probe | scale.knn_eval) "$py" -m "$entry" "$@" --check ;; esac

export SCALE_ENTRY=$entry
case "$mode" in
  srun)
    # One task per GPU: scale reads SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS. The job's
    # --cpus-per-task passed on explicitly: srun of Slurm 22.05-23.02 does not inherit it and gives
    # each task one CPU, where its loader workers would then share one core.
    cpus=()
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    # shellcheck disable=SC2086
    exec srun --kill-on-bad-exit=1 ${cpus[@]+"${cpus[@]}"} ${SCALE_SRUN_ARGS:-} "$py" -m "$entry" "$@"
    ;;
  torchrun)
    per_node=${SCALE_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
    per_node=${per_node%%(*}  # "8(x4)" -> 8
    # torchrun does not pass USR1/USR2 on to its workers and dies of them (its workers then outlive
    # it): the agent ignores them; the workers install scale's handler (the step's signal reaches
    # them directly).
    # shellcheck disable=SC2086,SC2016
    exec srun --kill-on-bad-exit=1 --ntasks="$nodes" --ntasks-per-node=1 \
      --cpus-per-task=$(( ${SLURM_CPUS_PER_TASK:-1} * per_node )) ${SCALE_SRUN_ARGS:-} \
      bash -c 'trap "" USR1 USR2; exec "$0" -m torch.distributed.run --nnodes="$1" --nproc-per-node="$2" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
        -m "$SCALE_ENTRY" "${@:3}"' "$py" "$nodes" "$per_node" "$@"
    ;;
  *)
    echo "SCALE_LAUNCH=$mode: use srun (one task per GPU) or torchrun (one per node)" >&2
    exit 2
    ;;
esac
