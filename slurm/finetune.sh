#!/bin/bash
# End-to-end fine-tuning (scale-finetune) with the DeiT recipe the authors fine-tuned with, through
# the pretraining trainer and backends: preemption (USR2), requeue and resume as in pretraining.
# The default is the model zoo's ViT-B/16 (150 epochs, batch 512 = 1 node x 8 GPUs x 64 images);
# any fine-tuning recipe by --recipe, e.g. ViT-L/16 (100 epochs) or a Table 5 transfer recipe:
#   sbatch slurm/finetune.sh --pretrained runs/vit_b_300ep
#   sbatch slurm/finetune.sh --recipe vit_l_finetune --pretrained runs/vit_l_300ep --parallel.backend=fsdp
#   sbatch slurm/finetune.sh --recipe cifar100_vit_b_transfer --pretrained vit-b-300ep.pth.tar
#   sbatch --nodes=2 slurm/finetune.sh --recipe vit_l_finetune ...   (any size: the batch splits per rank)
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@600
#SBATCH --output=slurm-%x-%j.out
SCALE_ENTRY=scale.finetune exec "${SCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --recipe vit_b_finetune "$@"
