"""Evaluation in the training loop: validation loss/perplexity, and for pair data greedy
generation of the first train.eval_generate validation examples, scored with BLEU and chrF
(`encdec eval` scores the same examples of the exported folder by default; bad samples among
them are not scored; the number scored is logged as `generated`).

Generation never stalls a sharded (ZeRO-3) run: data-parallel rank r decodes its own positions of
those examples (r, r + dp, ...: ceil(N / dp) of them on every rank), through the engine's full
forward (so ZeRO-3 gathers parameters the usual way), in the same number of batches and decoding
steps on every rank; the hypotheses are gathered to rank 0, which scores them. With tensor
parallelism the logits are vocabulary-sharded, so generation is skipped there (the validation
loss is still computed).
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
from launcher.precision import precision_of
from launcher.training.engine import all_reduce, to_device
from model.generate import greedy


TABLE_ROWS = 32          # generations shown in the eval table (eval_samples.jsonl, wandb); all are scored


@torch.no_grad()
def evaluate(engine, stream: DataStream, cfg: RunConfig, mesh: Mesh, device: str, tokenizer_path: str,
             is_rank0: bool, n_generate: int | None = None) -> tuple[dict, list | None]:
    """-> (results, generation table rows on rank 0 or None). Collective over all ranks."""
    n_generate = cfg.train.eval_generate if n_generate is None else n_generate
    engine.eval()
    # eager (train.compile's graphs are for the training shapes; evaluation's change every batch),
    # attention kernels fit for changing shapes (Precision.inference)
    with torch.compiler.set_stance("force_eager"), precision_of(cfg).inference(device):
        try:
            return _evaluate(engine, stream, cfg, mesh, device, tokenizer_path, is_rank0, n_generate)
        finally:
            engine.train()


def _evaluate(engine, stream, cfg, mesh, device, tokenizer_path, is_rank0, n_generate):
    n = steps_in_epoch(stream.spec, 0)
    # this rank's share of the first n_generate positions (local row q is position dp_rank + dp * q)
    k = min(-(-n_generate // mesh.dp), n * stream.micro_batch) \
        if cfg.data.objective == "pairs" and cfg.parallel.tp == 1 else 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # summed on the device: no sync per batch
    count = torch.zeros((), dtype=torch.float64, device=device)
    it = iter(stream)
    rows = []
    for _ in range(n):
        host = next(it)
        for i in range(min(len(host["keys"]), k - len(rows))):
            rows.append((stream.dp_rank + mesh.dp * len(rows), host["src"][i][host["src_mask"][i]],
                         host["labels"][i]))
        unpadded = bool(host["src_mask"].all())      # as in training: no padding, no attention mask
        b = to_device(host, device)
        segments = {"src_segments": b["src_segments"]} if "src_segments" in b else {}
        # the engine's forward runs in train.precision (its torch_autocast section, launcher/precision.py)
        loss, cnt = engine(b["src"], None if unpadded else b["src_mask"], b["tgt_in"], b["labels"], **segments)
        loss_sum += loss.detach().double()
        count += cnt.double()
    tot = all_reduce(torch.stack([loss_sum, count]), device, mesh.dp_group)
    val = tot[0].item() / max(tot[1].item(), 1)
    res = {"loss": val, "ppl": math.exp(min(val, 50))}
    table = None
    if k:
        scores, table = _generation_scores(engine, rows, n_generate, cfg, mesh, device, tokenizer_path,
                                           is_rank0)
        res.update(scores)
    return res, table


def _generation_scores(engine, rows: list, n_generate: int, cfg: RunConfig, mesh: Mesh, device: str,
                       tokenizer_path: str, is_rank0: bool):
    """rows: this rank's (position, source ids, labels); the same count on every rank."""
    c = engine.module.config

    def forward(s, m, y):
        return engine(s, m, y)
    tok = Tokenizer.from_file(tokenizer_path)

    def text(ids):
        ids = [i for i in ids if i >= 0]
        ids = ids[:ids.index(c.eos_id)] if c.eos_id in ids else ids
        return tok.decode(ids, skip_special_tokens=True)

    # no gradients, no saved activations: a generation batch can be several training micro-batches
    bs = 4 * cfg.train.micro_batch_size
    rows = sorted(rows, key=lambda r: -len(r[1]))
    mine = []
    for j in range(0, len(rows), bs):
        part = rows[j:j + bs]
        S = max(len(r[1]) for r in part)
        src = torch.full((len(part), S), c.pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), S), dtype=torch.bool)
        for i, r in enumerate(part):
            src[i, :len(r[1])], mask[i, :len(r[1])] = r[1], True
        # the same number of steps on every rank (lockstep: ZeRO-3 gathers inside each forward)
        ys = greedy(engine.module, src.to(device), mask.to(device), max_new_tokens=cfg.data.max_tgt_len,
                    forward=forward, stop_early=False)
        mine += [(pos, bool((lab != -100).any()), {"source": text(s.tolist()), "reference": text(lab.tolist()),
                                                   "hypothesis": text(h.tolist()[1:])})
                 for (pos, s, lab), h in zip(part, ys.cpu())]
    gathered = [None] * mesh.dp if is_rank0 else None
    if dist.get_world_size(mesh.dp_group) > 1:
        dist.gather_object(mine, gathered, dst=dist.get_global_rank(mesh.dp_group, 0), group=mesh.dp_group)
    else:
        gathered = [mine]
    if not is_rank0:
        return {}, None
    # the first n_generate positions, bad samples (placeholders: no labels) not scored
    scored = [r for pos, real, r in sorted(x for part in gathered for x in part) if pos < n_generate and real]
    if not scored:
        return {"generated": 0}, None
    return ({**score([r["hypothesis"] for r in scored], [r["reference"] for r in scored]), "generated": len(scored)},
            scored[:TABLE_ROWS])
