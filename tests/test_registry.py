"""The architecture registry (model/registry.py): every registered architecture round-trips through
its Hugging Face adapter bitwise and computes the HF class's logits; models build on the meta device
without touching torch; and nothing outside the registry and the architectures' own files asks which
architecture a config is (so adding one touches the registry, its files and their tests only)."""
import ast
import os

import pytest
import torch

from model import ARCHS, build, get, make_config
from reference import untie_head
from tests.conftest import ROOT

# a tiny config of every registered architecture (a new architecture adds its own here)
TINY = {
    "transformer": [dict(norm="pre"), dict(norm="post", activation="gelu")],
    "t5": [dict(head_dim=6, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                layer_norm_eps=1e-6), dict(tie_embeddings=True, layer_norm_eps=1e-6)],
    "bart": [dict(activation_dropout=0.1, attention_dropout=0.1),
             dict(scale_embedding=True, activation="relu", decoder_start_id=1, forced_bos_id=2)],
}
BASE = dict(vocab_size=96, real_vocab_size=90, d_model=32, n_heads=4, d_ff=48, n_encoder_layers=2,
            n_decoder_layers=2, dropout=0.0, max_positions=64)
CASES = [(a, i) for a in ARCHS for i in range(len(TINY.get(a, [None])))]


def _cfg(arch, i):
    if arch not in TINY:
        pytest.fail(f"tests/test_registry.py: add a tiny config of model.arch={arch} to TINY")
    return make_config(arch=arch, **{**BASE, **TINY[arch][i]})


def _perturbed(c, seed):
    torch.manual_seed(seed)
    m = build(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 * p.std().nan_to_num(0.1) + 0.05))
    return m.eval()


def _hf_model(c, sd):
    import transformers
    adapter = get(c.arch).hf
    hm = getattr(transformers, adapter.class_name(c))(adapter.hf_config(c))
    if "lm_head.weight" in adapter.key_map(c).values():
        untie_head(hm)                                     # an untied head, as from_pretrained gives it
    missing, unexpected = hm.load_state_dict(adapter.to_hf_state_dict(sd, c), strict=False)
    assert not unexpected and set(missing) <= set(adapter.tied(c)), (missing, unexpected)
    return hm.eval()


@pytest.mark.parametrize("arch,i", CASES)
def test_hf_round_trip_is_bitwise_and_logits_match(arch, i):
    c = _cfg(arch, i)
    ours = _perturbed(c, 3 + i)
    adapter = get(arch).hf
    hm = _hf_model(c, ours.state_dict())
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, c.real_vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 7:] = False
    tgt = torch.randint(3, c.real_vocab_size, (3, 9), generator=g)
    tgt[:, 0] = c.decoder_start_id
    with torch.no_grad():
        theirs = hm(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
        mine = ours(src, mask, tgt)
    V = c.real_vocab_size
    torch.testing.assert_close(mine[..., :V], theirs[..., :V], rtol=1e-4, atol=1e-4)
    # HF -> ours -> HF, bitwise
    hf_sd = {k: v for k, v in hm.state_dict().items()}
    back = adapter.from_hf_state_dict(hf_sd, c)
    again = build(c, "meta").to_empty(device="cpu")
    again.load_state_dict(back, strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    out = adapter.to_hf_state_dict(again.state_dict(), c)
    for k, v in out.items():
        assert torch.equal(v, hf_sd[k].float()), k


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_build_touches_nothing_and_init_weights_materialises(arch):
    c = _cfg(arch, 0)
    m = build(c, "meta")
    assert all(p.is_meta for p in m.parameters()) and all(b.is_meta for b in m.buffers())
    assert get(arch).count_parameters(c) == sum(p.numel() for p in m.parameters())
    m = m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    ref = build(c)
    for (k, b), (_, r) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, r), k                        # the fixed tables: functions of the config
    for k, p in m.named_parameters():
        assert torch.isfinite(p).all(), k


def test_config_classes_refuse_another_architectures_settings():
    from launcher.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"unknown config key 'model.head_dim' of model.arch=transformer"):
        load_config(os.path.join(ROOT, "configs/test-tiny.yaml"), ["model.head_dim=8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.norm' of model.arch=t5"):
        load_config(os.path.join(ROOT, "configs/test-tiny.yaml"), ["model.arch=t5", "model.norm=post"])
    with pytest.raises(ConfigError, match=r"config key 'model.arch': must be one of"):
        load_config(os.path.join(ROOT, "configs/test-tiny.yaml"), ["model.arch=lstm"])


# ----------------------------------------------------------------------------- nobody else asks

def _arch_files() -> set[str]:
    out = {os.path.join(ROOT, "model", "registry.py")}
    for a in ARCHS:
        arch = get(a)
        for mod in (arch.model.__module__, arch.config.__module__, type(arch.hf).__module__):
            out.add(os.path.join(ROOT, *mod.split(".")) + ".py")
    return out


def _library_files():
    for pkg in ("common", "model", "data", "launcher"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _names() -> set[str]:
    """Every architecture name and every Hugging Face model_type an adapter reads."""
    return set(ARCHS) | {t for a in ARCHS for t in get(a).hf.model_types}


def _asks(node: ast.AST, names: set[str]) -> bool:
    def about_arch(x):
        return (isinstance(x, ast.Attribute) and x.attr in ("arch", "model_type")) or \
            (isinstance(x, ast.Name) and x.id in ("arch", "model_type"))

    def arch_literal(x):
        if isinstance(x, ast.Constant) and x.value in names:
            return True
        return isinstance(x, (ast.Tuple, ast.List, ast.Set)) and any(arch_literal(e) for e in x.elts)
    if isinstance(node, ast.Compare):
        parts = [node.left, *node.comparators]
        return any(about_arch(p) for p in parts) or any(arch_literal(p) for p in parts)
    return False


def test_nothing_outside_the_registry_asks_which_architecture():
    own, names = _arch_files(), _names()
    arch_modules = {os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".") for p in own} - {"model.registry"}
    bad = []
    for path in _library_files():
        if path in own:
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if _asks(node, names):
                bad.append(f"{rel}:{node.lineno}: compares an architecture")
            if isinstance(node, ast.ImportFrom) and node.module in arch_modules:
                bad.append(f"{rel}:{node.lineno}: imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name in arch_modules for a in node.names):
                bad.append(f"{rel}:{node.lineno}: imports an architecture's module")
    assert not bad, "\n".join(bad)
