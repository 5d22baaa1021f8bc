#!/bin/bash
# Linear probe of a frozen backbone, the authors' protocol (main_lincls.py): 90 epochs, global batch
# 1024, SGD momentum 0.9, base lr 3 (lr 12), cosine; RandomResizedCrop + flip; top-1/top-5 on val.
# 1 node x 8 GPUs x 128 images: a frozen ViT-H is 1.3 GB in bf16 and keeps no activations for a
# backward, so one node of any size fits every model; only the head is trained (DDP over 8 GPUs).
#   sbatch slurm/linear_probe.sh runs/vit_b_300ep --train /data/in1k-shards/train-*.tar --val /data/in1k-shards/val-*.tar
#   sbatch slurm/linear_probe.sh vit-b-300ep.pth.tar --model vit_base --lrs 1,3,10 --train ... --val ...
# As pretraining: the command line is checked once (`--check`) before any rank starts; SIGUSR2 (10
# minutes before the time limit, or `scancel --signal=USR2 JOB`) saves the heads, the optimizer and
# the data position (OUT/probe_state.pt) and requeues the job, which resumes there (same job id,
# same output folder); the results equal an uninterrupted probe's. docs/slurm.md.
#SBATCH --job-name=linear_probe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
SCALE_ENTRY=scale.linear_probe exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" "$@"
