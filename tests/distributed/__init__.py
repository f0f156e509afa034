"""Tests of meta-training across processes (loft.distributed, DistributedDataParallel)."""
