#!/bin/bash
# MoCo v3 ResNet-50, 1000 epochs, global batch 4096 = 2 nodes x 8 GPUs x 256 images per GPU: the
# authors' layout for every R-50 run (CONFIG.md: 16 V100-32G). LARS, base lr 0.3 (x 4096 / 256), wd 1.5e-6,
# momentum 0.996 on a cosine to 1, tau 1.0, crops from 20% up; published linear accuracy 74.6%
# (docs/recipes.md). --parallel.backend=auto: the planner's choice here,
# `python -m benchmarks.plan --model resnet50 --gpus 16 --gpu-memory 80`: DDP, 256 images per GPU,
# 0.6 GiB of model state + 24.4 GiB of activations = 25.0 GiB (simulated peak 24.8 GiB); ZeRO is
# not considered (it takes AdamW, not LARS).
#SBATCH --job-name=r50_1000ep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe r50_1000ep --parallel.backend=auto "$@"
