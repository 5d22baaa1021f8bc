#!/bin/bash
# MoCo v3 ViT-H/14, 300 epochs, global batch 4096 = 8 nodes x 8 GPUs x 64 images per GPU.
# --parallel.backend=auto: the planner (scale.train.planner) picks the layout at start-up for the
# launched world size and the GPU's memory and logs it with the runner-up; an explicit backend
# (--parallel.backend=hsdp, --deepspeed ds_configs/zero2.json) is never overridden. Its choice here
# (`python -m benchmarks.plan --model vit_huge --gpus 64 --gpu-memory 80`): ZeRO-1 (DeepSpeed
# installed; else HSDP), 64 images per GPU, 57.3 GiB of the 70 GiB it allows an 80 GB GPU, ~3.9 h per
# 100 epochs projected on 64 H100s; the runner-up, HSDP (49.5 GiB), is 2% faster, DDP (61.1 GiB) 2%
# slower: within the time model's margin. On 40-48 GB GPUs it shards further; with
# --parallel.activation_checkpointing=true 4 nodes (128 per GPU) fit (benchmarks/results/plan-*.md).
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
exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_h_300ep --parallel.backend=auto "$@"
