#!/bin/bash
# MoCo v3 ViT-L/16, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# DDP, no activation checkpointing: 6.1 GiB of replicated model state + 19.6 GiB of activations
# (scale.train.memory: ~33 GiB per 80 GB GPU with slack), so neither sharding nor recomputation is
# needed; DDP moves 2.6 GB per rank and step, overlapped with the backward (~1.4 h per 100 epochs
# projected on 64 H100s, benchmarks/results/scaling.md). On 4 nodes (128 per GPU, ~58 GiB) it still fits.
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
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_l_300ep "$@"
