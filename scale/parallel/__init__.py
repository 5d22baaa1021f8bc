"""Parallelism applied from outside the models: process groups, key gather, cross-rank BatchNorm."""
