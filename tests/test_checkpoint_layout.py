"""Resume on another layout: a checkpoint of one (dp, ZeRO stage) continues on another.

A straight run on the source layout saves at step K and runs on to N. Each target layout resumes
from the step-K checkpoint (loaded through launcher/reshard.py) and runs to N: its losses must
follow the straight run's within LOSS_RTOL (fp32; only the summation order of the data-parallel
reductions differs) and it must see exactly the same samples (same token count at N, same
data-stream position). Dropout is off so that the comparison isolates the checkpoint.
The forced reshard on the *same* layout must be bitwise exact (all state is transferred).
"""
import os

import pytest
from ckpt_helpers import metrics, run_ranks, tiny_data, train  # noqa: F401 - tiny_data is a fixture

N, K = 5, 2
LOSS_RTOL = 1e-5
COMMON = (f"train.steps={N}", "train.micro_batch_size=2", "model.dropout=0.0")


def _run(data, out, overrides, env=None):
    os.environ.update(env or {})
    t = train(data, out, *COMMON, *overrides)
    return {"losses": {s: r["loss"] for s, r in metrics(out).items()}, "tokens_seen": t.tokens_seen,
            "data": t.stream.state_dict(), "step": t.step}


def _source(data, base, world, zero):
    out = os.path.join(base, f"src-dp{world}-z{zero}")
    res = run_ranks(world, _run, data, out, [f"parallel.zero_stage={zero}", f"checkpoint.every={K}", "checkpoint.keep=5"], tmp=base)
    return os.path.join(out, "checkpoints", f"step{K:08d}"), res


def _target(data, base, ckpt, world, zero, env=None):
    out = os.path.join(base, f"dst-dp{world}-z{zero}")
    return run_ranks(world, _run, data, out, [f"parallel.zero_stage={zero}", f"checkpoint.resume={ckpt}"], env,
                     tmp=base)


def _check(src, dst, exact=False):
    assert dst["step"] == N and dst["tokens_seen"] == src["tokens_seen"] and dst["data"] == src["data"]
    worst = 0.0
    for s in range(K + 1, N + 1):
        a, b = src["losses"][str(s)], dst["losses"][str(s)]
        if exact:
            assert a == b, (s, a, b)
        worst = max(worst, abs(a - b) / abs(a))
    assert worst <= LOSS_RTOL, worst
    # the resumed run did not restart: its first logged step is K+1
    assert min(int(s) for s in dst["losses"]) == K + 1
    return worst


@pytest.mark.parametrize("targets", [[(1, 0), (4, 3), (2, 2, "exact")]])
def test_dp2_zero2_to_dp1_dp4(tiny_data, tmp_path, targets):
    ckpt, src = _source(tiny_data, str(tmp_path), 2, 2)
    for world, zero, *exact in targets:
        env = {"ENCDEC_RESHARD": "always"} if exact else None
        dst = _target(tiny_data, str(tmp_path), ckpt, world, zero, env)
        print(f"dp2/ZeRO-2 -> dp{world}/ZeRO-{zero}: max rel loss diff {_check(src, dst, bool(exact)):.2e}")


def test_dp4_zero3_and_dp1_zero0_to_others(tiny_data, tmp_path):
    ckpt, src = _source(tiny_data, str(tmp_path / "a"), 4, 3)
    dst = _target(tiny_data, str(tmp_path / "a"), ckpt, 1, 1)
    print(f"dp4/ZeRO-3 -> dp1/ZeRO-1: max rel loss diff {_check(src, dst):.2e}")
    ckpt, src = _source(tiny_data, str(tmp_path / "b"), 1, 0)
    dst = _target(tiny_data, str(tmp_path / "b"), ckpt, 2, 3)
    print(f"dp1/ZeRO-0 -> dp2/ZeRO-3: max rel loss diff {_check(src, dst):.2e}")
