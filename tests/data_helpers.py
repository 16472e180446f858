"""Building data streams in tests the way the trainer does: a DataConfig (the run's defaults for
whatever a test leaves out), the datasets and the vocabulary, through the one builder StreamSpec."""
from data.config import DataConfig
from data.mixture import Component
from data.spec import StreamSpec, Vocab

OWN_SENTINELS = tuple(range(3, 103))        # <extra_id_0..99> of the tokenizers `encdec prepare` trains


def stream_spec(shards=None, objective="pairs", components=None, global_batch=8, shuffle=True, sentinel_ids=None,
                ul2_modes=(), vocab_size=0, **data) -> StreamSpec:
    comps = components or [Component("", list(shards), objective)]
    ids = (("ul2", tuple(ul2_modes)),) if ul2_modes else ()
    vocab = Vocab(vocab_size, OWN_SENTINELS if sentinel_ids is None else tuple(sentinel_ids), ids)
    return StreamSpec(DataConfig(**data), comps, global_batch, shuffle, vocab)
