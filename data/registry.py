"""The training objectives encdec knows, by name (data.objective, data.mixture[i].objective).

Each is a data.objectives.Objective class: what it reads (text or pairs), how its datasets are cut
into examples (packing), how an example is made from a chunk with an RNG keyed by its position,
what it checks of the config and needs of the tokenizer. The stream (data/spec.py, data/reader.py,
data/stream.py) and the config (data/config.py) ask the objective, never its name: adding one is
its own file and one entry here.
"""
from __future__ import annotations

from data.bart import Bart
from data.objectives import Objective, Pairs, SpanCorruption
from data.ul2 import UL2

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (Pairs, SpanCorruption, UL2, Bart)}


def sample_kind(objective: str) -> str:
    """What a dataset of this objective reads: "text" or "pairs"."""
    return OBJECTIVES[objective].reads
