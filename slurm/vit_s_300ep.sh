#!/bin/bash
# MoCo v3 ViT-S/16, 300 epochs, global batch 4096 = 4 nodes x 8 GPUs x 128 images per GPU.
# --parallel.backend=auto: the planner (scale.train.planner) picks the layout at start-up for the
# launched world size and the GPU's memory and logs it with the runner-up; an explicit backend
# (--parallel.backend=fsdp, --deepspeed ds_configs/zero2.json) is never overridden. Its choice here,
# `python -m benchmarks.plan --model vit_small --gpus 32 --gpu-memory 80`: DDP, 128 images per GPU,
# 0.8 GiB of model state + 8.3 GiB of activations = 9.1 GiB, ~0.2 h per 100 epochs projected on 32
# H100s (benchmarks/results/scaling.md). More nodes shorten the run (8 nodes: 64 per GPU).
#SBATCH --job-name=vit_s_300ep
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_s_300ep --parallel.backend=auto "$@"
