"""`encdec convert CHECKPOINT OUT`: a training checkpoint (any ZeRO stage) -> a Hugging Face folder.

OUT holds config.json, model.safetensors, generation_config.json and the tokenizer, loadable by
AutoModelForSeq2SeqLM / AutoTokenizer.from_pretrained(OUT) with stock transformers. Runs offline in
one process; written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from launcher.checkpoint import LATEST, CheckpointError, read_latest
from launcher.config import config_from_dict
from model.hf_adapter import hf_config, to_hf_state_dict


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A run folder, a checkpoints folder (with `latest`) or one checkpoint tag folder -> (root, tag)."""
    path = path.rstrip("/")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isfile(os.path.join(root, LATEST)):
            return root, read_latest(root)
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointError(f"not a checkpoint: {path} (no '{LATEST}' file or trainer_state.json)")


def load_trainer_state(root: str, tag: str) -> dict:
    p = os.path.join(root, tag, "trainer_state.json")
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} is incomplete: no trainer_state.json")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _zero_stage(tag_dir: str) -> int:
    return 3 if glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_*_model_states.pt")) else 0


def _load_ds(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def consolidated_state_dict(root: str, tag: str, cfg) -> dict:
    """The unsharded fp32 model parameters of a checkpoint, whatever its ZeRO stage and TP degree."""
    tag_dir = os.path.join(root, tag)
    tp = cfg.parallel.tp
    if _zero_stage(tag_dir) == 3:
        if tp != 1:
            raise CheckpointError("ZeRO-3 checkpoints with tp > 1 are not supported")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
    shards = []
    for r in range(tp):
        f = os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt")
        if not os.path.isfile(f):
            raise CheckpointError(f"checkpoint file missing: {f}")
        shards.append({k: v.float() for k, v in _load_ds(f)["module"].items()})
    if tp == 1:
        return shards[0]
    from launcher.parallel.plan import merge_tp_state_dicts, shard_dims_for_config
    return merge_tp_state_dicts(shards, shard_dims_for_config(cfg.model))


def convert(checkpoint: str, out: str, overwrite: bool = False) -> str:
    root, tag = resolve_checkpoint(checkpoint)
    state = load_trainer_state(root, tag)
    cfg = config_from_dict(state["config"])
    mc = cfg.model
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"output folder exists: {out} (pass --overwrite)")
    tok = os.path.join(root, "tokenizer.json")
    if not os.path.isfile(tok):
        raise CheckpointError(f"checkpoint {root} has no tokenizer.json")
    sd = consolidated_state_dict(root, tag, cfg)
    hf_sd = to_hf_state_dict(sd, mc)
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        from safetensors.torch import save_file
        from transformers import GenerationConfig
        from data.tokenizer import save_hf_tokenizer
        hcfg = hf_config(mc)
        hcfg.architectures = [{"pre": "PegasusForConditionalGeneration", "post": "MarianMTModel"}[mc.norm]]
        hcfg.save_pretrained(tmp)
        GenerationConfig(decoder_start_token_id=mc.decoder_start_id, eos_token_id=mc.eos_id, pad_token_id=mc.pad_id,
                         bos_token_id=mc.decoder_start_id,
                         max_new_tokens=cfg.data.max_tgt_len).save_pretrained(tmp)
        save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_hf_tokenizer(tok, tmp, model_max_length=cfg.data.max_src_len)
        with open(os.path.join(tmp, "encdec_source.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": os.path.abspath(os.path.join(root, tag)), "step": state["step"]}, f)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
