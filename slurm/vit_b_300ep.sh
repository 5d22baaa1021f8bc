#!/bin/bash
# MoCo v3 ViT-B/16, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# --parallel.backend=auto: the planner (scale.train.planner) picks the layout at start-up for the
# launched world size and the GPU's memory and logs it with the runner-up; an explicit backend
# (--parallel.backend=fsdp, --deepspeed ds_configs/zero2.json) is never overridden. Its choice here,
# `python -m benchmarks.plan --model vit_base --gpus 64 --gpu-memory 80`: DDP, 64 images per GPU,
# 2.0 GiB of model state + 8.4 GiB of activations = 10.4 GiB, ~0.4 h per 100 epochs projected on
# 64 H100s (benchmarks/results/scaling.md), against the paper's 2.1 h on 256 TPU-v3 cores.
#SBATCH --job-name=vit_b_300ep
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_b_300ep --parallel.backend=auto "$@"
