"""Hugging Face transformers: export a checkpoint to a folder (export.py), import a folder as a
checkpoint (importer.py), generate with a converted folder (generate.py), and the streaming
safetensors writer both use (st_writer.py)."""
