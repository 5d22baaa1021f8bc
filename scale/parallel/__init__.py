"""Parallelism applied from outside the models: the backend contract and its implementations
(single process, DDP, FSDP2, DeepSpeed ZeRO), process-group start-up, the key gather, cross-rank
BatchNorm and activation checkpointing. Nothing here knows about MoCo beyond the duck-typed calls
documented in `scale.parallel.base`."""
