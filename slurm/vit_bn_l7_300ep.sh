#!/bin/bash
# MoCo v3 ViT-BN-L/7 (the paper's best, 81.0%), 300 epochs, global batch 4096 = 16 nodes x 8 GPUs x
# 32 images per GPU. FSDP2 with activation checkpointing: its 1,025 tokens per crop keep 51 GiB of
# activations at 32 images without checkpointing (~65-72 GiB per 80 GB GPU with slack under any
# backend: too close); checkpointing every block cuts them to 5.1 GiB for ~33% more compute, and
# FSDP2 shards the 6.1 GiB of state (~8 GiB in all), leaving room for 64 images on 8 nodes
# (sbatch --nodes=8 slurm/vit_bn_l7_300ep.sh, ~14 GiB). Without checkpointing it needs 32 nodes
# (16 per GPU, DDP ~41 GiB): sbatch --nodes=32 slurm/vit_bn_l7_300ep.sh --parallel.backend=ddp
# --parallel.activation_checkpointing=false.
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
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_bn_l7_300ep --parallel.backend=fsdp \
  --parallel.activation_checkpointing=true "$@"
