"""Evaluation as the paper measures it: linear probing and kNN of a frozen backbone, from any
checkpoint (a run of any backend, the authors' releases, timm state dicts). Reuses scale/data and
the process-group helpers of scale/parallel; knows nothing of the trainer."""
