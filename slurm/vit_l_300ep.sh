#!/bin/bash
# MoCo v3 ViT-L/16, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# --parallel.backend=auto: the planner (scale.train.planner) picks the layout at start-up for the
# launched world size and the GPU's memory and logs it with the runner-up; an explicit backend
# (--parallel.backend=ddp, --deepspeed ds_configs/zero2.json) is never overridden. Its choice here
# (`python -m benchmarks.plan --model vit_large --gpus 64 --gpu-memory 80`): HSDP (sharded inside
# each node, replicated across), 64 images per GPU, 23.0 GiB, ~1.4 h per 100 epochs projected on
# 64 H100s; the runner-up, DDP (28.6 GiB), is 2.5% slower in the time model.
#SBATCH --job-name=vit_l_300ep
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_l_300ep --parallel.backend=auto "$@"
