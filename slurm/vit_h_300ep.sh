#!/bin/bash
# MoCo v3 ViT-H/14, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# DeepSpeed ZeRO-2, no activation checkpointing: DDP would replicate 12.2 GiB of model state (632 M
# parameters, two encoders, AdamW) next to 42.7 GiB of activations, ~70 GiB per 80 GB GPU with slack,
# too close; ZeRO-2 partitions gradients and optimizer state to 5.0 GiB (~61 GiB in all) and moves
# fewer bytes than DDP (3.9 vs 5.2 GB per rank and step: ~3.8 h per 100 epochs projected on 64
# H100s, benchmarks/results/scaling.md). FSDP2 (--parallel.backend=fsdp) needs ~55 GiB but twice the
# traffic; with --parallel.activation_checkpointing=true, 4 nodes (128 per GPU) fit in ~17 GiB.
#SBATCH --job-name=vit_h_300ep
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_h_300ep --parallel.backend=deepspeed \
  --parallel.deepspeed_config=ds_configs/zero2.json "$@"
