"""Checkpoints: the on-disk format (format.py), save and resume (manager.py), whole tensors from
any layout (reader.py), loading them into another layout (reshard.py), every rank's RNG (rng.py),
and a Hugging Face folder read as a checkpoint to start from (hf_folder.py)."""
