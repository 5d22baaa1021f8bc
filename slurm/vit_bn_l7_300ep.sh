#!/bin/bash
# MoCo v3 ViT-BN-L/7 (the paper's best, 81.0%), 300 epochs, global batch 4096 = 16 nodes x 8 GPUs x
# 32 images per GPU. --parallel.backend=auto: the planner (scale.train.planner) picks the backend at
# start-up for the launched world size and the GPU's memory and logs it with the runner-up; an
# explicit backend is never overridden. Its choice here, `python -m benchmarks.plan --model
# vit_bn_large_p7 --gpus 128 --gpu-memory 80`: DDP without recompute, 6.1 GiB of model state + 57.7
# GiB of activations = 63.7 GiB planned (simulated peak 60.8 GiB) of the 70 GiB it allows, ~4.2 h per
# 100 epochs projected on 128 H100s. Where memory is tighter, selective recompute keeps each block's
# matmul and attention outputs (43.2 GiB, 4.3 h) and full recompute less again:
# sbatch slurm/vit_bn_l7_300ep.sh --parallel.activation_checkpointing=selective
#SBATCH --job-name=vit_bn_l7_300ep
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_bn_l7_300ep --parallel.backend=auto "$@"
