"""Evaluation in the training loop: validation loss/perplexity, and for pair data greedy
generation on a few validation sources scored with BLEU and chrF.

Generation never stalls a sharded (ZeRO-3) run: every data-parallel rank decodes its own slice of
the sources in lockstep, through the engine's full forward (so ZeRO-3 gathers parameters the
usual way), for the same number of decoding steps on every rank; the hypotheses are gathered to
rank 0, which scores them. With tensor parallelism the logits are vocabulary-sharded, so
generation is skipped there (the validation loss is still computed).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from data.stream import DataStream, steps_in_epoch
from launcher.config import RunConfig
from launcher.monitor.scores import score
from launcher.parallel.dims import Mesh
from launcher.training.engine import all_reduce, to_device
from model.generate import greedy


@torch.no_grad()
def evaluate(engine, stream: DataStream, cfg: RunConfig, mesh: Mesh, device: str, tokenizer_path: str,
             is_rank0: bool, n_generate: int = 32) -> tuple[dict, list | None]:
    """-> (results, generation table rows on rank 0 or None). Collective over all ranks."""
    engine.eval()
    try:
        n = steps_in_epoch(stream.spec, 0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # summed on the device: no sync per batch
        count = torch.zeros((), dtype=torch.float64, device=device)
        it = iter(stream)
        first = None
        for _ in range(n):
            host = next(it)
            unpadded = bool(host["src_mask"].all())      # as in training: no padding, no attention mask
            b = to_device(host, device)
            first = first or b
            segments = {"src_segments": b["src_segments"]} if "src_segments" in b else {}
            # the engine's forward runs in train.precision (its torch_autocast section, launcher/precision.py)
            loss, cnt = engine(b["src"], None if unpadded else b["src_mask"], b["tgt_in"], b["labels"], **segments)
            loss_sum += loss.detach().double()
            count += cnt.double()
        tot = all_reduce(torch.stack([loss_sum, count]), device, mesh.dp_group)
        val = tot[0].item() / max(tot[1].item(), 1)
        res = {"loss": val, "ppl": math.exp(min(val, 50))}
        rows = None
        if cfg.data.objective == "pairs" and cfg.parallel.tp == 1 and first is not None and n_generate:
            scores, rows = _generation_scores(engine, first, max(1, n_generate // mesh.dp), cfg, mesh, device,
                                              tokenizer_path, is_rank0)
            res.update(scores)
    finally:
        engine.train()
    return res, rows


def _generation_scores(engine, batch: dict, n: int, cfg: RunConfig, mesh: Mesh, device: str, tokenizer_path: str,
                       is_rank0: bool):
    c = engine.module.config
    src, mask, labels = batch["src"][:n], batch["src_mask"][:n], batch["labels"][:n]

    def forward(s, m, y):
        return engine(s, m, y)
    # the same number of steps on every rank (lockstep: ZeRO-3 gathers inside each forward)
    ys = greedy(engine.module, src, mask, max_new_tokens=cfg.data.max_tgt_len, forward=forward, stop_early=False)
    tok = Tokenizer.from_file(tokenizer_path)

    def text(ids):
        ids = [i for i in ids if i >= 0]
        ids = ids[:ids.index(c.eos_id)] if c.eos_id in ids else ids
        return tok.decode(ids, skip_special_tokens=True)

    mine = [{"source": text(s.tolist()), "reference": text(r.tolist()), "hypothesis": text(h.tolist()[1:])}
            for s, r, h in zip(src, labels, ys)]
    gathered = [None] * mesh.dp if is_rank0 else None
    if dist.get_world_size(mesh.dp_group) > 1:
        dist.gather_object(mine, gathered, dst=dist.get_global_rank(mesh.dp_group, 0), group=mesh.dp_group)
    else:
        gathered = [mine]
    if not is_rank0:
        return {}, None
    rows = [r for part in gathered for r in part]
    return score([r["hypothesis"] for r in rows], [r["reference"] for r in rows]), rows
