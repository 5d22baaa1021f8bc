#!/bin/bash
# MoCo v3 ViT-B/16, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# DDP, no activation checkpointing: 2.0 GiB of replicated model state + 7.4 GiB of activations
# (scale.train.memory: ~13 GiB per 80 GB GPU with slack); DDP moves 0.85 GB per rank and step, the
# least of all backends, ~0.4 h per 100 epochs of projected step time on 64 H100s
# (benchmarks/results/scaling.md), against the paper's 2.1 h on 256 TPU-v3 cores.
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
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_b_300ep "$@"
