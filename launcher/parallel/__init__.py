"""Tensor parallelism x data parallelism for the encdec Transformer, applied from outside the model.

    dims.py   ParallelDims (degrees, validation, process groups) -> Mesh; DeepSpeedMPU
    tp.py     column/row-parallel linear, vocab-parallel embedding and cross-entropy
    plan.py   parallelize(model, mesh), activation checkpointing, shard merge/split helpers
"""
from launcher.parallel.dims import (DeepSpeedMPU, Mesh, ParallelDims, check_model_for_tp,
                                    check_supported)
from launcher.parallel.plan import (apply_activation_checkpointing, gather_full_state_dict, merge_tp_state_dicts,
                                    parallelize, shard_dims, shard_dims_for_config, split_state_dict)

__all__ = ["DeepSpeedMPU", "Mesh", "ParallelDims", "check_model_for_tp", "check_supported", "apply_activation_checkpointing",
           "gather_full_state_dict", "merge_tp_state_dicts", "parallelize", "shard_dims",
           "shard_dims_for_config", "split_state_dict"]
