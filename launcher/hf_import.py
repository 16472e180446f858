"""Start (or continue) pretraining from a Hugging Face model folder of the Pegasus or Marian class.

Two ways:
  - `checkpoint.resume=HF_DIR` in a training config: the run starts from the folder's weights
    (fresh optimizer, step 0, data from the start); the run's model settings must match the
    folder's (the error lists the differences) and its tokenizer must have the same vocabulary.
  - `python -m launcher.hf_import HF_DIR OUT`: writes an encdec checkpoint (layout-free format:
    model.safetensors keyed by our parameter names, trainer_state.json, tokenizer.json), usable
    as `checkpoint.resume=OUT` and by `encdec convert`; prints the model settings to train with.

HF -> encdec -> HF is bitwise: the weights are renamed, never recomputed. What our model cannot
represent is refused with a clear error: a trained final_logits_bias (ours is 0 on the real
vocabulary and -1e9 on padding rows, which fixes real_vocab_size), untied output embeddings,
position tables other than the sinusoids, unscaled embeddings.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from common.atomic import atomic_dir
from launcher.ckpt_reader import CheckpointError, CheckpointReader, load_pt
from launcher.config import RunConfig, config_to_dict

def _weights_index(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> the file holding it (single or sharded safetensors, or a weights_only .bin)."""
    st, idx = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(st):
        from safetensors import safe_open
        with safe_open(st, framework="pt") as f:
            return {k: st for k in f.keys()}
    if os.path.isfile(idx):
        with open(idx, encoding="utf-8") as f:
            return {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
    binf = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(binf):
        return {k: binf for k in load_pt(binf)}
    raise CheckpointError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _tensor(files: dict, cache: dict, key: str) -> torch.Tensor:
    path = files[key]
    if path not in cache:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            cache[path] = safe_open(path, framework="pt")
        else:
            cache[path] = load_pt(path)
    f = cache[path]
    return f[key] if isinstance(f, dict) else f.get_tensor(key)


def _real_vocab(bias: torch.Tensor, where: str) -> int:
    """final_logits_bias (1, V): zeros, then (optionally) <= -1e8 on padding rows -> the real vocabulary."""
    b = bias.reshape(-1)
    nz = (b != 0).nonzero()
    r = int(nz[0]) if len(nz) else b.numel()
    if not bool((b[r:] <= -1e8).all()):
        raise CheckpointError(f"{where}: final_logits_bias holds trained values; this model has no output bias "
                              f"(only 0 on the vocabulary and -1e9 on padding rows are supported)")
    return r


def hf_state(hf_dir: str) -> dict:
    """A trainer state (format "hf") describing the folder for launcher.ckpt_reader; validates it."""
    from transformers import AutoConfig
    from model.hf_adapter import HF_TIED, from_hf_state_dict, model_config_from_hf
    from model.transformer import sinusoid_table
    hf_dir = os.path.abspath(hf_dir)
    try:
        hcfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
        mc = model_config_from_hf(hcfg)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    checks = [("scale_embedding", True), ("tie_word_embeddings", True),
              ("decoder_attention_heads", hcfg.encoder_attention_heads), ("decoder_ffn_dim", hcfg.encoder_ffn_dim)]
    if hcfg.model_type == "marian":
        checks += [("share_encoder_decoder_embeddings", True), ("decoder_vocab_size", hcfg.vocab_size)]
    for key, want in checks:
        got = getattr(hcfg, key, want)
        if got != want and not (key == "decoder_vocab_size" and got is None):
            raise CheckpointError(f"{hf_dir}/config.json: {key}={got!r} is not supported (needs {want!r})")
    files, cache = _weights_index(hf_dir), {}
    if "final_logits_bias" in files:
        mc.real_vocab_size = _real_vocab(_tensor(files, cache, "final_logits_bias"), hf_dir)
    shared = _tensor(files, cache, "model.shared.weight") if "model.shared.weight" in files else None
    table = sinusoid_table(mc.max_positions, mc.d_model)
    for k in files:
        if k in HF_TIED:
            if shared is not None and not torch.equal(_tensor(files, cache, k), shared):
                raise CheckpointError(f"{hf_dir}: {k} differs from model.shared.weight (untied embeddings)")
        if "embed_positions" in k and not torch.equal(_tensor(files, cache, k).float(), table):
            raise CheckpointError(f"{hf_dir}: {k} is not the sinusoid table of {mc.max_positions} x {mc.d_model}")
    try:
        names = from_hf_state_dict({k: k for k in files}, mc)     # our name -> HF name (tied/fixed ones dropped)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
    weights = {ours: (files[k], k) for ours, k in names.items()}
    mc.vocab_multiple = mc.vocab_size          # a config with these settings pads the tokenizer to this size
    cfg = RunConfig(model=mc)
    cfg.data.max_src_len = min(cfg.data.max_src_len, mc.max_positions)
    cfg.data.max_tgt_len = min(cfg.data.max_tgt_len, mc.max_positions - 1)
    return {"format": "hf", "step": 0, "tokens_seen": 0, "data": None, "layout": None,
            "config": config_to_dict(cfg), "weights": weights, "source": hf_dir}


def import_hf(hf_dir: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the folder as an encdec checkpoint (layout-free) at OUT; returns its trainer state."""
    from tqdm import tqdm
    from launcher.checkpoint import file_digest
    from launcher.st_writer import StreamingSafetensorsWriter
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"not a Hugging Face model folder (no config.json): {hf_dir}")
    state = hf_state(hf_dir)
    tok = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        raise CheckpointError(f"{hf_dir}: no tokenizer.json (a fast tokenizer is needed to train on)")
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"output folder exists: {out} (pass --overwrite)")
    reader = CheckpointReader(hf_dir, state)
    with atomic_dir(out) as tmp:
        specs = [(n, torch.float32, s) for n, s in reader.shapes.items()]
        with StreamingSafetensorsWriter(os.path.join(tmp, "model.safetensors"), specs, {"format": "pt"}) as w:
            for n in tqdm(reader.names(), desc="import", unit="tensor", disable=not progress, mininterval=0.5):
                w.write(n, reader.get(n))
        shutil.copyfile(tok, os.path.join(tmp, "tokenizer.json"))
        saved = {k: v for k, v in state.items() if k not in ("weights",)}
        saved.update(format="layout-free", format_version=1,
                     files={f: file_digest(os.path.join(tmp, f)) for f in ("model.safetensors", "tokenizer.json")})
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=1)
    return saved


def main(argv: list[str] | None = None) -> int:
    import argparse
    import yaml
    p = argparse.ArgumentParser(prog="python -m launcher.hf_import", description=__doc__.splitlines()[0])
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        st = import_hf(a.hf_dir, a.out, overwrite=a.overwrite)
    except CheckpointError as e:
        print(f"encdec: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}; train from it with checkpoint.resume={a.out} and these model settings:")
    print(yaml.safe_dump({"model": st["config"]["model"]}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
