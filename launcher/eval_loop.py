"""Evaluation in the training loop: validation loss/perplexity, and for pair data greedy
generation on a few validation sources scored with BLEU and chrF.

Generation never stalls a sharded (ZeRO-3) run: every data-parallel rank decodes its own slice of
the sources in lockstep, through the engine's full forward (so ZeRO-3 gathers parameters the
usual way), for the same number of decoding steps on every rank; the hypotheses are gathered to
rank 0, which scores and logs them. With tensor parallelism the logits are vocabulary-sharded,
so generation is skipped there (the validation loss is still computed).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from data.stream import steps_in_epoch
from launcher.build import build_stream


@torch.no_grad()
def evaluate(trainer, n_generate: int = 32) -> dict:
    cfg = trainer.cfg
    trainer.engine.eval()
    try:
        stream = build_stream(cfg, cfg.data.valid, trainer.dp_rank, trainer.dp, shuffle=False,
                              global_batch=cfg.train.micro_batch_size * trainer.dp)
        n = steps_in_epoch(stream.spec, 0)
        tot = torch.zeros(2, dtype=torch.float64)
        it = iter(stream)
        first = None
        for _ in range(n):
            b = trainer._to_device(next(it))
            first = first or b
            with trainer._autocast():
                loss, cnt = trainer.engine(b["src"], b["src_mask"], b["tgt_in"], b["labels"])
            tot += torch.tensor([loss.item(), cnt.item()], dtype=torch.float64)
        tot = trainer._all_reduce(tot, trainer.dp_group)
        val = tot[0].item() / max(tot[1].item(), 1)
        res = {"loss": val, "ppl": math.exp(min(val, 50))}
        rows = None
        if cfg.data.objective == "pairs" and cfg.parallel.tp == 1 and first is not None and n_generate:
            scores, rows = _generation_scores(trainer, first, max(1, n_generate // trainer.dp))
            res.update(scores)
    finally:
        trainer.engine.train()
    trainer.monitor.log_eval(trainer.step, res, table_rows=rows)
    return res


def _generation_scores(trainer, batch: dict, n: int):
    from tokenizers import Tokenizer
    c = trainer.engine.module.config
    src, mask, labels = batch["src"][:n], batch["src_mask"][:n], batch["labels"][:n]
    ys = torch.full((src.shape[0], 1), c.decoder_start_id, dtype=torch.long, device=src.device)
    for _ in range(trainer.cfg.data.max_tgt_len):       # the same count on every rank: lockstep
        with trainer._autocast():
            logits = trainer.engine(src, mask, ys)
        ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    tok = Tokenizer.from_file(trainer.tokenizer_path)

    def text(ids):
        ids = [i for i in ids if i >= 0]
        ids = ids[:ids.index(c.eos_id)] if c.eos_id in ids else ids
        return tok.decode(ids, skip_special_tokens=True)

    mine = [{"source": text(s.tolist()), "reference": text(r.tolist()), "hypothesis": text(h.tolist()[1:])}
            for s, r, h in zip(src, labels, ys)]
    gathered = [None] * trainer.dp if trainer.is_rank0 else None
    if dist.get_world_size(trainer.dp_group) > 1:
        dist.gather_object(mine, gathered, dst=_dp_global_rank0(trainer), group=trainer.dp_group)
    else:
        gathered = [mine]
    if not trainer.is_rank0:
        return {}, None
    rows = [r for part in gathered for r in part]
    from launcher.evaluate_gen import score
    return score([r["hypothesis"] for r in rows], [r["reference"] for r in rows]), rows


def _dp_global_rank0(trainer) -> int:
    return dist.get_global_rank(trainer.dp_group, 0) if trainer.dp_group is not None else 0
