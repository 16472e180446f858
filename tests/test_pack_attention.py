"""Document-aware attention (data.pack_attention): in a packed example, the encoder output of a
document does not depend on the other documents' tokens; without segments it does."""
import torch

from model.transformer import Transformer, TransformerConfig as ModelConfig, document_mask


def _model():
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                    n_decoder_layers=2, dropout=0.1, max_positions=64)
    return Transformer(c).eval()


def test_other_documents_do_not_change_a_documents_encoding():
    model = _model()
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4 + [-1] * 2, [0] * 18])
    mask = seg >= 0
    src = torch.randint(3, 60, seg.shape)
    src[~mask] = 0
    changed = src.clone()
    changed[0, 5:12] = torch.randint(3, 60, (7,))                      # document 1 of row 0 rewritten
    assert not torch.equal(changed, src)
    with torch.no_grad():
        a, b = model.encode(src, mask, seg), model.encode(changed, mask, seg)
        others = torch.cat([torch.arange(0, 5), torch.arange(12, 16)])
        assert torch.allclose(a[0, others], b[0, others], atol=1e-6)
        assert not torch.allclose(a[0, 5:12], b[0, 5:12], atol=1e-3)
        assert torch.equal(a[1], b[1])
        plain_a, plain_b = model.encode(src, mask), model.encode(changed, mask)   # off: attention crosses documents
        assert not torch.allclose(plain_a[0, others], plain_b[0, others], atol=1e-3)
        # one document per row: the same as no segments
        assert torch.allclose(a[1], plain_a[1], atol=1e-6)
        # the loss path takes src_segments too, and stays finite with padding
        tgt = torch.randint(3, 60, (2, 6))
        loss, n = model(src, mask, tgt, tgt, src_segments=seg)
        assert torch.isfinite(loss) and n == 12


def test_document_mask_cpu():
    seg = torch.tensor([[0, 0, 1, -1]])
    m = document_mask(seg >= 0, seg)
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0].tolist() == [[True, True, False, False], [True, True, False, False],
                                [False, False, True, False], [True, True, True, False]]


def test_flex_block_mask_equals_the_sdpa_mask():
    """The BlockMask used on GPU (here built on CPU, run by eager flex_attention) attends exactly
    where the SDPA bool mask does."""
    import warnings
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 100 + [1] * 120 + [2] * 30 + [-1] * 6, [0] * 256])     # 2 x 2 blocks of 128
    q, k, v = (torch.randn(2, 4, 256, 16) for _ in range(3))
    bm = document_mask(seg >= 0, seg, flex=True)
    assert not isinstance(bm, torch.Tensor)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seg >= 0, seg, flex=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # eager flex warns that it is not fused
        out = flex_attention(q, k, v, block_mask=bm)
    assert torch.allclose(out, ref, atol=1e-5)


def _train_both(data: str, out: str) -> dict:
    """On each rank: a Trainer with data.pack_attention on, then off; -> first-step losses and eval losses."""
    from tests.ckpt_helpers import metrics, trainer
    from tests.conftest import read_metrics
    res = {}
    for on in ("true", "false"):
        run = f"{out}/run-{on}"
        t = trainer(data, run, f"data.valid={data}", "data.objective=span", "data.max_src_len=32",
                  "data.max_tgt_len=16", f"data.pack_attention={on}", "train.steps=2")
        t.train()
        res[on] = [metrics(run)[1]["loss"]] + [r["loss"] for r in read_metrics(run, "eval")]
    return res


def test_trainer_passes_segments(tmp_path):
    """2 ranks train and evaluate on packed span data with data.pack_attention on and off: the
    resolved inputs' stream carries src_segments, both runs finish with finite losses, and the
    first step's loss differs (the segments reach the model)."""
    import math
    import random
    from data.prepare import prepare
    from launcher.config import load_config
    from launcher.training.inputs import resolve_inputs
    from tests.ckpt_helpers import TINY, run_ranks
    rnd = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an which or be".split()
    (tmp_path / "t.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(2, 12)))
                                             for _ in range(400)) + "\n")
    data = str(tmp_path / "span")
    prepare([str(tmp_path / "t.txt")], data, vocab_size=300, shard_size=100, progress=False)
    cfg = load_config(TINY, [f"data.train={data}", "data.objective=span", "data.max_src_len=32",
                             "data.max_tgt_len=16", "data.pack_attention=true"])
    b = next(iter(resolve_inputs(cfg).stream(cfg, "train", 0, 1)))
    assert b["src_segments"].shape == b["src"].shape and int(b["src_segments"].max()) > 0
    res = run_ranks(2, _train_both, data, str(tmp_path), tmp=str(tmp_path))
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in res.values()), res
    assert res["true"][0] != res["false"][0], res
