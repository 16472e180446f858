"""Hugging Face tokenizers in `encdec prepare --tokenizer`: sentinels wherever the tokenizer has them.

The T5-style tokenizer here is built with the tokenizers library the way T5's is laid out:
<pad> </s> <unk> = 0 1 2, the word pieces, then <extra_id_99> ... <extra_id_0> at the very end
of the vocabulary (so <extra_id_0> is the last id), and a post-processor appending </s>.
"""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data.corpus import CorpusError
from data.prepare import prepare
from data.sources import DataError
from data.stream import DataStream, resolve_shards
from tests.data_helpers import stream_spec
from data.tokenizer import EOS_ID, load_tokenizer, sentinel_ids
from tests.test_objectives import _reassemble

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()


def _docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(n)]


def _t5_style_tokenizer(folder, docs, n_sentinels=20, post=True):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(n_sentinels))])
    if post:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_t5_style_sentinels_reassemble_the_text(tmp_path):
    docs = _docs()
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    tdir = _t5_style_tokenizer(tmp_path / "t5tok", docs)
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "out"), objective="span", tokenizer=tdir, progress=False)
    tok = load_tokenizer(str(tmp_path / "out"))
    ids = sentinel_ids(tok)
    V = tok.get_vocab_size()
    assert ids == list(range(V - 1, V - 21, -1))              # <extra_id_0> is the last id, counting down
    spec = stream_spec(shards=resolve_shards(str(tmp_path / "out")), objective="span", num_streams=2,
                      shuffle_block=8, seed=3, global_batch=4, max_src_len=96, max_tgt_len=64,
                      noise_density=0.3, mean_span_length=2.0, sentinel_ids=ids, pack=False)
    encoded = [(tok.encode(d).ids[:-1], d) for d in docs]
    seen, used = 0, set()
    for b in DataStream(spec, 0, 1, micro_batch=4):
        for src, m, lab in zip(b["src"], b["src_mask"], b["labels"]):
            inp, tgt = src[m].tolist(), lab[lab != -100].tolist()
            assert inp[-1] == EOS_ID and tgt[-1] == EOS_ID and tgt[0] == ids[0]
            used.update(t for t in tgt if t in ids)
            rebuilt = _reassemble(inp, tgt, set(ids))
            # the original document (its first raw_len tokens when longer), text for text
            doc = next(d for e, d in encoded if e[:len(rebuilt)] == rebuilt)
            assert len(rebuilt) == min(spec.raw_len, len(tok.encode(doc).ids) - 1)
            assert doc.startswith(tok.decode(rebuilt))
            seen += 1
        if seen >= 28:
            break
    assert seen >= 28 and len(used) >= 3                       # several sentinels, all from the end


def test_tokenizer_without_sentinels_is_refused(tmp_path):
    docs = _docs(10)
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    tdir = _t5_style_tokenizer(tmp_path / "plain", docs, n_sentinels=0, post=False)
    with pytest.raises(CorpusError, match="no sentinel tokens"):
        prepare([str(tmp_path / "c.txt")], str(tmp_path / "out"), objective="span", tokenizer=tdir, progress=False)
    # pairs need none; the copied tokenizer gains the </s> post-processor prepared data relies on
    rows = [json.dumps({"src": d, "tgt": d[::-1]}) for d in docs]
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    prepare([str(tmp_path / "p.jsonl")], str(tmp_path / "pairs"), objective="pairs", tokenizer=tdir, progress=False)
    tok = load_tokenizer(str(tmp_path / "pairs"))
    assert tok.encode(docs[0]).ids[-1] == EOS_ID
    # and a span stream over such a tokenizer's (empty) sentinel list fails with one clear line
    with pytest.raises(DataError, match="sentinel"):
        stream_spec(shards=resolve_shards(str(tmp_path / "pairs")), objective="span", sentinel_ids=[],
                   num_streams=2, global_batch=4, max_src_len=32, max_tgt_len=32)
