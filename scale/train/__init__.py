"""Where models, data and parallelism meet: the trainer, checkpoints, metrics, the kNN monitor."""
