"""Tensor parallelism x data parallelism for the encdec Transformer, applied from outside the model.

    dims.py   ParallelDims (degrees, process groups) -> Mesh; DeepSpeedMPU; validate_layout (the one check)
    tp.py     column/row-parallel linear, vocab-parallel embedding and cross-entropy
    plan.py   parallelize(model, mesh), activation checkpointing, shard_dims (which key splits where)
"""
from launcher.parallel.dims import (DeepSpeedMPU, Mesh, ParallelDims, check_model_for_tp, check_supported,
                                    validate_layout)
from launcher.parallel.plan import apply_activation_checkpointing, parallelize, shard_dims

__all__ = ["DeepSpeedMPU", "Mesh", "ParallelDims", "check_model_for_tp", "check_supported", "validate_layout",
           "apply_activation_checkpointing", "parallelize", "shard_dims"]
