#!/bin/bash
# MoCo v3 ViT-S/16, 300 epochs, global batch 4096 = 4 nodes x 8 GPUs x 128 images per GPU.
# DDP, no activation checkpointing: 22 M parameters replicate for 0.8 GiB of model state per GPU and
# 128 images keep ~7 GiB of activations (scale.train.memory: ~11 GiB per 80 GB GPU with slack); DDP
# moves the fewest bytes of all backends (benchmarks/results/scaling.md). More nodes shorten the run
# (the per-GPU batch follows: 8 nodes -> 64), fewer raise memory (2 nodes -> 256 per GPU, ~20 GiB).
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
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_s_300ep "$@"
