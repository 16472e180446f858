"""encdec's launcher: everything that runs a model (the model itself is in model/, data in data/).

    cli.py  config.py  dist_env.py  signals.py  train.py  demo.py     entry points and settings
    training/     the trainer, engine/optimizer builders, LR schedule, evaluation, inputs
    checkpoint/   on-disk format, save/resume, any-layout reader, reshard, HF folders as sources
    hf/           Hugging Face export, import, generation, streaming safetensors writer
    parallel/     parallel degrees and groups, the TP plan and layers
    monitor/      metrics.jsonl + wandb, FLOPs/MFU, plots, BLEU/chrF
"""
