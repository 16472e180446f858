"""Greedy decoding with the project's own model: the one decode loop of the project (evaluation
and the tests use it; beam search for users is transformers' generate() on the exported folder).
No KV cache: the decoder is re-run over the prefix each step, which keeps the model code free of
cache plumbing."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def greedy(model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor, max_new_tokens: int = 64,
           forward=None, stop_early: bool = True) -> torch.Tensor:
    """src (B, S) -> (B, 1 + n) token ids starting with the decoder start token, as HF generate returns
    (then config.forced_bos_id and, at the last step, config.forced_eos_id when set, as HF's
    forced_bos_token_id / forced_eos_token_id make them).

    forward(src, src_mask, tgt) -> logits replaces the model's own encode-once/decode steps (the
    trainer's evaluation decodes through the DeepSpeed engine so ZeRO-3 gathers parameters);
    stop_early=False runs all max_new_tokens steps (ranks decoding in lockstep).
    """
    c = model.config
    if forward is None:
        memory = model.encode(src, src_mask)

        def next_logits(out):
            return model.logits(model.decode(out, memory, src_mask)[:, -1])
    else:
        def next_logits(out):
            return forward(src, src_mask, out)[:, -1]
    out = torch.full((src.shape[0], 1), c.decoder_start_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for step in range(max_new_tokens):
        if step == max_new_tokens - 1 and c.forced_eos_id >= 0:    # HF's forced_eos_token_id at the length limit
            nxt = torch.full_like(out[:, 0], c.forced_eos_id)
        elif step == 0 and c.forced_bos_id >= 0:                   # HF's forced_bos_token_id: no decoding
            nxt = torch.full_like(out[:, 0], c.forced_bos_id)
        else:
            nxt = next_logits(out).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, c.pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == c.eos_id
        if stop_early and done.all():
            break
    return out
