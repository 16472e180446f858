"""Tokenizer: a byte-level BPE trained with Hugging Face tokenizers, saved as tokenizer.json.

Special ids are fixed so the model, the data and the exported Hugging Face model agree:
    0 <pad>   1 </s> (eos)   2 <unk>   3.. <extra_id_0>, <extra_id_1>, ... (span-corruption sentinels)
Every encoded sequence ends with </s> (a post-processor appends it).

A Hugging Face tokenizer (a folder with tokenizer.json, e.g. T5's) is used as it is, provided
<pad> </s> <unk> are 0 1 2; its sentinels are its own <extra_id_N> tokens wherever they sit
(T5's count down from the end of the vocabulary: <extra_id_0> = 32099): sentinel_ids(tok).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.errors import UserError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SENTINELS = 100
SENTINEL_BASE = 3


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens(num_sentinels: int = NUM_SENTINELS) -> list[str]:
    return [PAD, EOS, UNK] + [sentinel(i) for i in range(num_sentinels)]


def _with_post_processor(tok: Tokenizer) -> Tokenizer:
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, EOS_ID)])
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_sentinels: int = NUM_SENTINELS) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(num_sentinels),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(special_tokens(num_sentinels)):
        assert tok.token_to_id(s) == i, f"special token {s} did not get id {i}"
    return _with_post_processor(tok)


def tokenizer_file(path: str) -> str:
    """A tokenizer.json, or the one in a folder (prepared data, a Hugging Face model folder)."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def load_tokenizer(path: str) -> Tokenizer:
    path = tokenizer_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    tok = Tokenizer.from_file(path)
    for i, s in enumerate([PAD, EOS, UNK]):
        if tok.token_to_id(s) != i:
            raise UserError(f"tokenizer {path}: special token {s} must have id {i}, has {tok.token_to_id(s)}")
    return tok


def sentinel_ids(tok: Tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... (up to the first one missing), wherever they are."""
    out = []
    while (i := tok.token_to_id(sentinel(len(out)))) is not None:
        out.append(int(i))
    return out


def num_sentinels(tok: Tokenizer) -> int:
    return len(sentinel_ids(tok))


def ensure_eos(tok: Tokenizer) -> bool:
    """Makes every encoding end with </s> (as prepared data must); True when a post-processor was added."""
    if tok.encode("a").ids[-1:] == [EOS_ID]:
        return False
    _with_post_processor(tok)
    return True


def text_tokenizer(path: str) -> Tokenizer:
    """The tokenizer raw text is encoded with: as `encdec prepare --tokenizer PATH` makes it (</s> appended)."""
    tok = load_tokenizer(path)
    ensure_eos(tok)
    return tok


def tokenizer_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_hf_tokenizer(tok_path: str, out_dir: str, model_max_length: int) -> None:
    """Writes a folder AutoTokenizer.from_pretrained loads (stock PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast
    tok = load_tokenizer(tok_path)
    n = num_sentinels(tok)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                 additional_special_tokens=[sentinel(i) for i in range(n)],
                                 model_max_length=model_max_length)
    hf.save_pretrained(out_dir)
