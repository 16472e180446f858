"""`encdec prepare`: raw text -> tokenizer -> tokenized webdataset tar shards + length indexes + manifest.json.

Inputs (data/corpus.py): plain text (one document per line), JSONL, or webdataset tars of text (a
document per sample: .txt members, or a .json member's --text-field), compressed or not, told
apart by their content; binary data is refused.

Output folder (written under a temporary name, renamed when complete):
    tokenizer.json           the tokenizer (trained here on a bounded sample, or a copy of the one given)
    shard-000000.tar ...     webdataset shards; each sample is KEY.json = {"src": [ids], "tgt": [ids]}
                             for pairs or {"ids": [ids]} for monolingual text (every list ends with </s>)
    shard-000000.len ...     span: the length index, one uint32 per document (tokens without </s>)
    manifest.json            objective, sample and token counts per shard, index names and sums,
                             bad lines per input file, tokenizer sha256

The work is cut into units (consecutive input files, at least `unit_bytes` of them each; a plain
file larger than that is cut into pieces of `unit_bytes` at line starts; the cut depends on the
inputs only) and done in three steps that share one work folder OUT.parts/:
  plan    checks the inputs, trains or copies the tokenizer, writes plan.json;
  slice   `--slice i/n`: units u = i (mod n) not done yet, each written atomically to unit-U/;
  merge   every unit done -> the shards renamed in unit order into OUT (atomically), one manifest.
`--workers N` runs the N slices as processes on this machine; slurm/prepare.sbatch runs them as
an array job. Either way the result is the same as one process's: units never depend on n.
A rerun after a failure redoes only the units without their unit.json.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time

import numpy as np

from common.atomic import atomic_dir, atomic_write
from data.corpus import CorpusError, read_records
from data.packed import INDEX_DTYPE, doc_length, index_name
from data.prepare_plan import BadLines, limit_text, make_plan, read_plan, work_dir
from data.rawtext import encode
from data.sources import MANIFEST
from data.tokenizer import load_tokenizer

TAR_MTIME = 946684800        # fixed member times (2000-01-01): shards are byte-identical however they were made
log = logging.getLogger("encdec.prepare")


def prepare(inputs: list[str], out_dir: str, objective: str = "span", tokenizer: str | None = None,
            vocab_size: int = 8000, shard_size: int = 10000, text_field: str = "text", src_field: str = "src",
            tgt_field: str = "tgt", overwrite: bool = False, progress: bool = True, workers: int = 1,
            max_bad_lines: str = "1%", tokenizer_sample: int = 1 << 30, unit_bytes: int = 256 << 20,
            seed: int = 0, add_tokens=()) -> dict:
    """Plan, every slice (in `workers` processes), merge; nothing is left behind on failure."""
    work = make_plan(inputs, out_dir, objective=objective, tokenizer=tokenizer, vocab_size=vocab_size,
                     shard_size=shard_size, fields=(text_field, src_field, tgt_field), overwrite=overwrite,
                     max_bad_lines=max_bad_lines, tokenizer_sample=tokenizer_sample, unit_bytes=unit_bytes,
                     seed=seed, add_tokens=add_tokens)
    try:
        if workers <= 1:
            run_slice(work, 0, 1, progress)
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                pool.starmap(run_slice, [(work, i, workers, False) for i in range(workers)])
        return merge(out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def run_cli(a) -> int:
    """`encdec prepare` (launcher/cli.py): whole, or one of its steps (--plan-only, --slice I/N, --merge)."""
    if a.slice or a.merge:
        if a.inputs:
            raise CorpusError("--slice and --merge read the inputs from the plan: give no input files")
        if a.merge:
            man = merge(a.out, overwrite=a.overwrite)
        else:
            try:
                i, n = (int(x) for x in a.slice.split("/"))
                assert 0 <= i < n
            except (ValueError, AssertionError):
                raise CorpusError(f"--slice: expected I/N with 0 <= I < N, got {a.slice!r}") from None
            done = run_slice(work_dir(a.out), i, n, progress=not a.quiet)
            print(f"prepared {done} unit(s) of slice {i}/{n} in {work_dir(a.out)}")
            return 0
    else:
        kw = dict(objective=a.objective, tokenizer=a.tokenizer, vocab_size=a.vocab_size, shard_size=a.shard_size,
                  text_field=a.text_field, src_field=a.src_field, tgt_field=a.tgt_field, overwrite=a.overwrite,
                  max_bad_lines=a.max_bad_lines, tokenizer_sample=a.tokenizer_sample, unit_bytes=a.unit_size,
                  add_tokens=[t for t in (a.add_tokens or "").split(",") if t])
        if a.plan_only:
            kw["fields"] = (kw.pop("text_field"), kw.pop("src_field"), kw.pop("tgt_field"))
            work = make_plan(a.inputs, a.out, seed=0, **kw)
            print(f"planned {len(read_plan(work)['units'])} unit(s) in {work}")
            return 0
        man = prepare(a.inputs, a.out, progress=not a.quiet, workers=a.workers, **kw)
    print(f"prepared {man['num_samples']} samples, {man['num_tokens']} tokens in {len(man['shards'])} shards, "
          f"{man['num_bad_lines']} bad lines skipped -> {a.out}")
    return 0


def run_slice(work: str, i: int, n: int, progress: bool = False) -> int:
    """Units u = i (mod n) that are not done yet; -> how many were done now."""
    plan = read_plan(work)
    tok = load_tokenizer(os.path.join(work, "tokenizer.json"))
    done = 0
    for u in range(i, len(plan["units"]), n):
        if not os.path.isfile(os.path.join(work, f"unit-{u:05d}", "unit.json")):
            _run_unit(work, plan, u, tok, progress)
            done += 1
    return done


def _run_unit(work: str, plan: dict, u: int, tok, progress: bool) -> None:
    t0 = time.perf_counter()
    pieces = [(plan["inputs"][k], a, b) for k, a, b in plan["units"][u]]
    files = [p for p, _, _ in pieces]
    objective, shard_size = plan["objective"], plan["shard_size"]
    prefix = f"{u:05d}-" if len(plan["units"]) > 1 else ""
    bad = BadLines(plan["max_bad_lines"])
    records = (r for p, a, b in pieces
               for r in read_records(p, objective, *plan["fields"], on_bad=bad.add, start=a, end=b))
    final = os.path.join(work, f"unit-{u:05d}")
    with atomic_dir(final) as tmp:
        shards, lengths, n = [], [], 0
        with TarShards(tmp, shard_size) as writer:
            for batch in _batched(records, 1000):
                for row in encode(tok, batch):             # as the loader encodes raw text (rawtext.py)
                    if n % shard_size == 0:
                        _close_index(tmp, shards, lengths)
                        shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0, "num_tokens": 0})
                    sample = {"ids": row[0]} if objective == "span" else {"src": row[0], "tgt": row[1]}
                    writer.write(f"{prefix}{n:010d}.json", json.dumps(sample).encode())
                    shards[-1]["num_samples"] += 1
                    shards[-1]["num_tokens"] += sum(len(r) for r in row)
                    if objective == "span":
                        lengths.append(doc_length(row[0]))
                    n += 1
            _close_index(tmp, shards, lengths)
        info = {"unit": u, "files": files, "num_samples": n, "shards": shards, "bad_lines": bad.counts,
                "first_bad": bad.first, "lines": n + bad.total}
        atomic_write(os.path.join(tmp, "unit.json"), json.dumps(info, indent=1))
    if progress:
        mb = sum((b if b >= 0 else os.path.getsize(p)) - a for p, a, b in pieces) / 1e6
        print(f"prepare: unit {u + 1}/{len(plan['units'])}: {n} records, {bad.total} bad lines, "
              f"{mb:.1f} MB in {time.perf_counter() - t0:.1f} s", flush=True)


class TarShards:
    """shard-000000.tar, ... of `maxcount` samples each, as plain ustar members (owner bigdata, mode
    0444, time TAR_MTIME): what webdataset reads, written several times faster than through tarfile."""

    def __init__(self, folder: str, maxcount: int):
        self.folder, self.maxcount, self.n, self.f = folder, maxcount, 0, None

    def write(self, name: str, data: bytes) -> None:
        if self.n % self.maxcount == 0:
            self._end()
            self.f = open(os.path.join(self.folder, f"shard-{self.n // self.maxcount:06d}.tar"), "wb")
        self.f.write(_ustar_header(name.encode(), len(data)) + data + bytes(-len(data) % 512))
        self.n += 1

    def _end(self) -> None:
        if self.f is not None:
            self.f.write(bytes(1024))                   # end of archive: two zero blocks
            self.f.close()
            self.f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._end()


def _ustar_header(name: bytes, size: int) -> bytes:
    if len(name) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:124] = b"0000444\x000000000\x000000000\x00"            # mode, uid, gid
    h[124:148] = b"%011o\x00%011o\x00" % (size, TAR_MTIME)
    h[148:157] = b"        0"                                      # checksum placeholder, regular file
    h[257:265] = b"ustar\x0000"
    h[265:272] = h[297:304] = b"bigdata"                           # owner and group names
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _close_index(out: str, shards: list, lengths: list) -> None:
    if shards and lengths:
        s = shards[-1]
        s["index"], s["doc_tokens"] = index_name(s["name"]), int(sum(lengths))
        with open(os.path.join(out, s["index"]), "wb") as f:
            f.write(np.asarray(lengths, dtype=INDEX_DTYPE).tobytes())
    lengths.clear()


def merge(out_dir: str, overwrite: bool = False) -> dict:
    """Every unit done -> OUT (shards renamed in unit order, one manifest); the work folder is removed."""
    work = work_dir(out_dir)
    plan = read_plan(work)
    infos, missing = [], []
    for u in range(len(plan["units"])):
        path = os.path.join(work, f"unit-{u:05d}", "unit.json")
        if not os.path.isfile(path):
            missing.append(u)
            continue
        with open(path, encoding="utf-8") as f:
            infos.append(json.load(f))
    if missing:
        raise CorpusError(f"{len(missing)} of {len(plan['units'])} units not prepared yet (first: unit {missing[0]}, "
                          f"{plan['inputs'][plan['units'][missing[0]][0][0]]}): run the slices again")
    _check_bad_lines(plan, infos)
    if sum(i["num_samples"] for i in infos) == 0:
        raise CorpusError(f"empty corpus: no records in {', '.join(plan['inputs'])}")
    if os.path.exists(out_dir) and not overwrite and not plan.get("overwrite"):
        raise CorpusError(f"output folder exists: {out_dir} (pass --overwrite to replace it)")
    shards = []
    with atomic_dir(out_dir) as tmp:
        _link(os.path.join(work, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
        for info in infos:
            src = os.path.join(work, f"unit-{info['unit']:05d}")
            for s in info["shards"]:
                name = f"shard-{len(shards):06d}.tar"
                _link(os.path.join(src, s["name"]), os.path.join(tmp, name))
                s = dict(s, name=name)
                if "index" in s:
                    _link(os.path.join(src, s["index"]), os.path.join(tmp, index_name(name)))
                    s["index"] = index_name(name)
                shards.append(s)
        bad: dict[str, int] = {}
        for i in infos:                                  # a big file's pieces are several units
            for p, c in i["bad_lines"].items():
                bad[p] = bad.get(p, 0) + c
        manifest = {"objective": plan["objective"], "num_samples": sum(s["num_samples"] for s in shards),
                    "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards,
                    "tokenizer_sha256": plan["tokenizer_sha256"], "vocab_size": plan["vocab_size"],
                    "inputs": plan["inputs"], "bad_lines": bad, "num_bad_lines": sum(bad.values()),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _check_bad_lines(plan: dict, infos: list) -> None:
    total = sum(sum(i["bad_lines"].values()) for i in infos)
    lines = sum(i["lines"] for i in infos)
    count, frac = plan["max_bad_lines"]
    if total and (total > count if count is not None else total > frac * lines):
        first = next(i["first_bad"] for i in infos if i["first_bad"])
        raise CorpusError(f"{total} bad line(s) of {lines}, more than --max-bad-lines={limit_text(count, frac)} "
                          f"(first: {first})")


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _batched(it, n):
    from itertools import islice
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk
