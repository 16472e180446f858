"""A deterministic synthetic bilingual corpus for the demo: English number words -> Chinese numerals.

In the spirit of the paper's "I am a student -> 我是学生": "three thousand and forty-two" -> "三千零四十二".
Numbers 0..9999; a fixed, seeded split keeps the held-out sources out of training.
"""
from __future__ import annotations

import json
import os
import random

from common.atomic import atomic_file

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ZH = "零一二三四五六七八九"


def english(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return _TENS[t] + ("" if o == 0 else "-" + _ONES[o])
    if n < 1000:
        h, r = divmod(n, 100)
        return f"{_ONES[h]} hundred" + ("" if r == 0 else " and " + english(r))
    k, r = divmod(n, 1000)
    if r == 0:
        return f"{_ONES[k]} thousand"
    return f"{_ONES[k]} thousand " + ("and " if r < 100 else "") + english(r)


def chinese(n: int) -> str:
    if n < 10:
        return _ZH[n]
    digits = [int(c) for c in str(n)]
    units = ["", "十", "百", "千"]
    out, zero = [], False
    for i, d in enumerate(digits):
        pos = len(digits) - 1 - i
        if d == 0:
            zero = True
            continue
        if zero and out:
            out.append("零")
        zero = False
        if not (d == 1 and pos == 1 and i == 0):   # 10..19: 十, 十一 (not 一十)
            out.append(_ZH[d])
        out.append(units[pos])
    return "".join(out)


def split(n_heldout: int = 500, seed: int = 0, limit: int = 10000) -> tuple[list[int], list[int]]:
    nums = list(range(limit))
    random.Random(seed).shuffle(nums)
    return sorted(nums[n_heldout:]), sorted(nums[:n_heldout])


def write_corpus(out_dir: str, n_heldout: int = 500, seed: int = 0, repeat: int = 1) -> tuple[str, str]:
    """Writes train.jsonl and heldout.jsonl ({"src", "tgt"} per line); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    train, held = split(n_heldout, seed)
    rng = random.Random(seed + 1)
    paths = []
    for name, nums in (("train.jsonl", train * repeat), ("heldout.jsonl", held)):
        nums = list(nums)
        rng.shuffle(nums)
        path = os.path.join(out_dir, name)
        with atomic_file(path) as f:
            for n in nums:
                f.write(json.dumps({"src": english(n), "tgt": chinese(n)}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths[0], paths[1]
