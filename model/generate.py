"""Greedy and beam-search decoding with the project's own model (no KV cache: the decoder is
re-run over the prefix each step, which keeps the model code free of cache plumbing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.transformer import Transformer


@torch.no_grad()
def greedy(model: Transformer, src: torch.Tensor, src_mask: torch.Tensor, max_new_tokens: int = 64) -> torch.Tensor:
    """src (B, S) -> (B, 1 + n) token ids starting with the decoder start token, as HF generate returns."""
    c = model.config
    memory = model.encode(src, src_mask)
    out = torch.full((src.shape[0], 1), c.decoder_start_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        nxt = model.logits(model.decode(out, memory, src_mask)[:, -1]).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, c.pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == c.eos_id
        if done.all():
            break
    return out


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, src_mask: torch.Tensor, num_beams: int = 4,
                max_new_tokens: int = 64, length_penalty: float = 1.0) -> torch.Tensor:
    """One sentence at a time for clarity; returns (B, L) padded with pad_id."""
    c = model.config
    results = []
    for b in range(src.shape[0]):
        mem = model.encode(src[b:b + 1], src_mask[b:b + 1])
        beams = [([c.decoder_start_id], 0.0)]
        finished = []
        for _ in range(max_new_tokens):
            seqs = torch.tensor([s for s, _ in beams], device=src.device)
            m = mem.expand(len(beams), -1, -1)
            mask = src_mask[b:b + 1].expand(len(beams), -1)
            logp = F.log_softmax(model.logits(model.decode(seqs, m, mask)[:, -1]).float(), dim=-1)
            cand = []
            for (seq, score), lp in zip(beams, logp):
                top = lp.topk(num_beams)
                cand += [(seq + [int(t)], score + float(v)) for v, t in zip(top.values, top.indices)]
            cand.sort(key=lambda x: -x[1])
            beams = []
            for seq, score in cand:
                if seq[-1] == c.eos_id:
                    finished.append((seq, score / ((len(seq) - 1) ** length_penalty)))
                else:
                    beams.append((seq, score))
                if len(beams) == num_beams:
                    break
            if len(finished) >= num_beams and max(f[1] for f in finished) >= beams[0][1] / (len(beams[0][0]) ** length_penalty):
                break
        finished += [(s, sc / ((len(s) - 1) ** length_penalty)) for s, sc in beams]
        results.append(max(finished, key=lambda x: x[1])[0])
    L = max(len(r) for r in results)
    return torch.tensor([r + [c.pad_id] * (L - len(r)) for r in results], device=src.device)
