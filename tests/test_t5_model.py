"""model.arch=t5 against a real T5ForConditionalGeneration of the same shape (fp32, CPU).

Every parameter on both sides is perturbed away from its initial value (norm scales too), so a
key mapped to the wrong tensor, a missing rescale or a bias table read from the wrong layer
shows up in the logits.
"""
import pytest
import torch

from model import build, count_parameters, make_config as ModelConfig
from model.generate import greedy
from reference import as_t5_adapter_functions, untie_head

from_hf_state_dict, hf_config, hf_key_map, hf_tied, model_config_from_hf, to_hf_state_dict = as_t5_adapter_functions()

TOL = 1e-4


def _cfg(**kw):
    base = dict(arch="t5", vocab_size=96, real_vocab_size=96, d_model=32, n_heads=4, head_dim=6, d_ff=48,
                n_encoder_layers=2, n_decoder_layers=3, layer_norm_eps=1e-6, dropout=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=12)
    base.update(kw)
    return ModelConfig(**base)


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.2 if name.endswith("norm.weight") or "layer_norm" in name else 0.5 * p.std().item() + 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    for name, p in module.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} still at its initial value"
    return module


def _hf_model(c, seed=0):
    from transformers import T5ForConditionalGeneration
    torch.manual_seed(seed)
    hm = T5ForConditionalGeneration(hf_config(c))
    if not c.tie_embeddings:
        untie_head(hm)
    return _perturb(hm, seed).eval()


def _batch(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, c.real_vocab_size, (3, 21), generator=g)  # longer than max_distance: log buckets used
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, 7:] = False
    src = src.masked_fill(~mask, c.pad_id)
    tgt = torch.randint(3, c.real_vocab_size, (3, 17), generator=g)
    tgt[:, 0] = c.decoder_start_id
    return src, mask, tgt


def _hf_logits(hm, src, mask, tgt):
    with torch.no_grad():
        return hm(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits


def _hf_sd(hm, c):
    tied = set(hf_tied(c))
    return {k: v for k, v in hm.state_dict().items() if k not in tied}


@pytest.mark.parametrize("tied", [False, True], ids=["v1_1-untied", "original-tied"])
def test_import_then_compare(tied):
    c = _cfg(tie_embeddings=tied)
    hm = _hf_model(c)
    assert (hm.lm_head.weight is hm.shared.weight) == tied
    ours = build(c).eval()
    ours.load_state_dict(from_hf_state_dict(_hf_sd(hm, c), c), strict=True)
    src, mask, tgt = _batch(c)
    with torch.no_grad():
        got = ours(src, mask, tgt)
    want = _hf_logits(hm, src, mask, tgt)
    diff = (got - want)[mask.any(1)].abs().max().item()
    print(f"import tied={tied}: max |logits diff| = {diff:.2e}")
    assert diff < TOL
    # the loss too (T5's loss runs over the whole vocabulary)
    labels = tgt.roll(-1, 1)
    labels[:, -1] = -100
    s, n = ours(src, mask, tgt, labels)
    with torch.no_grad():
        hf_loss = hm(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt, labels=labels).loss
    assert abs(s.item() / n.item() - hf_loss.item()) < TOL


@pytest.mark.parametrize("tied", [False, True], ids=["v1_1-untied", "original-tied"])
def test_export_then_compare(tied):
    from transformers import T5ForConditionalGeneration
    c = _cfg(tie_embeddings=tied, n_encoder_layers=3, n_decoder_layers=2)
    torch.manual_seed(5)
    ours = _perturb(build(c), 5).eval()
    hm = T5ForConditionalGeneration(hf_config(c)).eval()
    if not tied:
        untie_head(hm)
    missing, unexpected = hm.load_state_dict(to_hf_state_dict(ours.state_dict(), c), strict=False)
    assert set(missing) <= set(hf_tied(c)) and not unexpected, (missing, unexpected)
    src, mask, tgt = _batch(c, 2)
    with torch.no_grad():
        got = ours(src, mask, tgt)
    diff = (got - _hf_logits(hm, src, mask, tgt)).abs().max().item()
    print(f"export tied={tied}: max |logits diff| = {diff:.2e}")
    assert diff < TOL


def test_greedy_generate_equals_own_decode():
    # equal stack depths: transformers 5.24 sizes generate()'s decoder cache by num_layers (the encoder's)
    c = _cfg(n_decoder_layers=2)
    hm = _hf_model(c, seed=3)
    ours = build(c).eval()
    ours.load_state_dict(from_hf_state_dict(_hf_sd(hm, c), c))
    src, mask, _ = _batch(c, 4)
    mine = greedy(ours, src, mask, max_new_tokens=12)
    with torch.no_grad():
        theirs = hm.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                             num_beams=1, decoder_start_token_id=c.decoder_start_id, eos_token_id=c.eos_id,
                             pad_token_id=c.pad_id)
    assert torch.equal(mine, theirs[:, :mine.shape[1]]), (mine, theirs)


def test_hf_to_encdec_to_hf_bitwise(tmp_path):
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration
    c = _cfg()
    hm = _hf_model(c, seed=7)
    hm.save_pretrained(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = from_hf_state_dict(saved, c)
    assert set(ours) == set(hf_key_map(c))
    back = to_hf_state_dict(ours, c)
    assert back.keys() == saved.keys()
    for k in saved:
        assert torch.equal(back[k], saved[k]), k
    # and the saved folder reloads as the config it was saved from
    c2 = model_config_from_hf(T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").config)
    for f in ("d_model", "n_heads", "head_dim", "d_ff", "n_encoder_layers", "n_decoder_layers", "tie_embeddings",
              "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_eps", "vocab_size"):
        assert getattr(c2, f) == getattr(c, f), f


# The published configs (config.json fields that matter), mapped without allocating any weights.
REAL = {
    "t5-v1_1-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                          num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False, n_positions=512),
    "t5-v1_1-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                         num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False, n_positions=512),
    "flan-t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                          num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False, n_positions=512,
                          decoder_start_token_id=0),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_t5_configs_map(name):
    from transformers import T5Config, T5ForConditionalGeneration
    h = T5Config(**REAL[name])
    c = model_config_from_hf(h)
    assert (c.arch, c.head_dim, c.n_heads, c.d_ff, c.tie_embeddings) == ("t5", 64, h.num_heads, h.d_ff, False)
    assert c.decoder_start_id == c.pad_id == 0 and c.eos_id == 1
    with torch.device("meta"):
        hm = T5ForConditionalGeneration(hf_config(c))
        untie_head(hm)
        ours = build(c)
    assert count_parameters(c) == (76961152 if name.endswith("small") else 247577856)   # the published sizes
    assert count_parameters(c) == sum(p.numel() for p in hm.parameters()) == sum(p.numel() for p in ours.parameters())
    assert set(hf_key_map(c).values()) == set(hm.state_dict()) - set(hf_tied(c))
    assert {k: tuple(v.shape) for k, v in to_hf_state_dict(ours.state_dict(), c).items()} == \
        {k: tuple(v.shape) for k, v in hm.state_dict().items() if k not in hf_tied(c)}


def test_mt5_config_maps_to_the_same_layout():
    from transformers import MT5Config, MT5ForConditionalGeneration
    c = model_config_from_hf(MT5Config(**{**REAL["t5-v1_1-small"], "vocab_size": 250112}))   # mt5-small's shape
    assert (c.arch, c.vocab_size, c.head_dim, c.tie_embeddings) == ("t5", 250112, 64, False)
    with torch.device("meta"):
        hm = MT5ForConditionalGeneration(hf_config(c))
        untie_head(hm)
    assert set(hf_key_map(c).values()) == set(hm.state_dict()) - set(hf_tied(c))
    assert count_parameters(c) == sum(p.numel() for p in hm.parameters()) == 300176768   # mt5-small's size


@pytest.mark.parametrize("field,value", [("feed_forward_proj", "relu"), ("model_type", "umt5")])
def test_unrepresentable_configs_refused(field, value):
    from transformers import T5Config, UMT5Config
    h = UMT5Config(**REAL["t5-v1_1-small"]) if field == "model_type" else T5Config(**{**REAL["t5-v1_1-small"], field: value})
    with pytest.raises(ValueError, match=field):
        model_config_from_hf(h)
