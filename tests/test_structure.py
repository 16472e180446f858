"""The house: every library module imports on its own, layers only import downwards, the effective
config saved by a run is complete, and the one layout check runs before any process group."""
import ast
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, run_cli

PACKAGES = ("common", "model", "data", "launcher")
# what each top-level package may import from the project (launcher is the top floor)
ALLOWED = {"common": {"common"}, "model": {"model", "common"}, "data": {"data", "common"},
           "launcher": set(PACKAGES)}


def _modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in sorted(files):
                if f.endswith(".py") and "__pycache__" not in dirpath:
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out.append(rel.removesuffix(".__init__"))
    return sorted(out)


def _project_imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def test_layers_import_only_downwards():
    bad = []
    for mod in _modules():
        path = os.path.join(ROOT, *mod.split(".")) + ".py"
        if not os.path.isfile(path):
            path = os.path.join(ROOT, *mod.split("."), "__init__.py")
        top = mod.split(".")[0]
        for imp in _project_imports(path):
            if imp.split(".")[0] not in ALLOWED[top]:
                bad.append(f"{mod} imports {imp}")
    assert not bad, bad


_FRESH_IMPORTS = r"""
import importlib, os, sys, traceback
# third-party libraries load once here; each project module is then imported by a forked child
# that holds no project module yet: an import circle or a wrong order fails in that child
import numpy, torch, deepspeed, transformers, webdataset, tokenizers, yaml, safetensors, tqdm  # noqa
project = {"common", "model", "data", "launcher"}
assert not [m for m in sys.modules if m.split(".")[0] in project]
failed = []
for mod in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(mod)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(mod)
print("FAILED:" + ",".join(failed))
"""


def test_every_module_imports_on_its_own():
    mods = _modules()
    assert len(mods) > 40 and "launcher.training.trainer" in mods
    r = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS, *mods], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FAILED:\n" in r.stdout or r.stdout.strip().endswith("FAILED:"), r.stdout[-500:] + r.stderr[-3000:]


def test_saved_config_is_complete_and_equals_the_checkpoints(tiny_pairs, tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train", "configs/test-tiny.yaml", f"data.train={tiny_pairs['train']}", f"out_dir={out}",
                 "train.steps=2", "checkpoint.every=1", "data.num_workers=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    from data.tokenizer import load_tokenizer
    real = load_tokenizer(os.path.join(tiny_pairs["train"], "tokenizer.json")).get_vocab_size()
    assert saved["model"]["real_vocab_size"] == real > 0
    assert saved["model"]["vocab_size"] >= real and saved["model"]["vocab_size"] % saved["model"]["vocab_multiple"] == 0
    import json
    for tag in ("step00000001", "step00000002"):
        state = json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())
        assert state["config"] == saved


def test_tp_group_across_nodes_is_refused_before_any_process_group(tiny_pairs, tmp_path):
    """Rank 0 of 2 ranks on 2 nodes (one rank per node) with tp=2: refused at once, naming the key;
    without the check it would wait for rank 1 in the process group until the timeout."""
    from launcher.dist_env import free_port
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "configs/test-tiny.yaml",
                        f"data.train={tiny_pairs['train']}", f"out_dir={tmp_path / 'run'}", "parallel.tp=2",
                        "train.collective_timeout_s=60"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("encdec: error: config key 'parallel.tp'"), r.stderr[-2000:]
    assert "span nodes" in lines[-1]
    assert time.monotonic() - t0 < 50
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world,per_node,tp,ok", [(8, 8, 2, True), (8, 4, 4, True), (8, 2, 4, False),
                                                    (4, 1, 2, False), (4, 0, 4, True)])
def test_layout_check_knows_nodes(world, per_node, tp, ok):
    from launcher.config import ConfigError, load_config
    from launcher.parallel.dims import validate_layout
    cfg = load_config(os.path.join(ROOT, "configs/test-tiny.yaml"),
                      [f"parallel.tp={tp}", f"train.global_batch_size={world * 4}", "train.micro_batch_size=4",
                       "model.n_heads=4", "model.d_ff=64"])
    if ok:
        assert validate_layout(cfg, world, per_node).dp == world // tp
    else:
        with pytest.raises(ConfigError, match="span nodes"):
            validate_layout(cfg, world, per_node)
