"""Re-saving a step that already exists (after a rollback) while `latest` names it: the folder
`latest` names holds a complete checkpoint at every instant, with the atomic folder swap and with
the two-rename fallback of filesystems that lack it (a kill between the renames is repaired)."""
import os
import threading

import pytest

from launcher.checkpoint import manager
from launcher.checkpoint.format import STATE_FILE, read_latest


def _checkpoint(path, content):
    os.makedirs(path)
    with open(os.path.join(path, STATE_FILE), "w") as f:
        f.write(content)


def _root_with_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root / "step00000004", "old")
    (root / "latest").write_text("step00000004")
    return str(root)


def test_resave_swap_never_leaves_latest_without_a_checkpoint(tmp_path):
    root = _root_with_latest(tmp_path)
    final = os.path.join(root, "step00000004")
    if not manager._exchange(final, final):      # swapping a folder with itself probes the syscall
        pytest.skip("this filesystem has no atomic folder swap (RENAME_EXCHANGE)")
    seen, bad, stop = [], [], threading.Event()

    def watch():                                 # a reader (another rank resuming) at every instant
        while not stop.is_set():
            tag = read_latest(root)
            try:
                seen.append(open(os.path.join(root, tag, STATE_FILE)).read())
            except OSError as e:
                bad.append(repr(e))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(300):
            part = final + ".partial"
            _checkpoint(part, f"new{i}")
            manager._move_into_place(part, final)
            assert not os.path.exists(part)
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:3]
    assert len(seen) > 100 and all(v == "old" or v.startswith("new") for v in seen)
    assert open(os.path.join(final, STATE_FILE)).read() == "new299"


def test_fallback_swap_killed_between_the_renames_is_repaired(tmp_path, monkeypatch):
    root = _root_with_latest(tmp_path)
    final = os.path.join(root, "step00000004")
    _checkpoint(final + ".partial", "new")
    # the fallback's first rename done, then the process killed: `latest` names a missing folder
    os.rename(final, final + ".replaced")
    assert read_latest(root) == "step00000004"
    assert open(os.path.join(final, STATE_FILE)).read() == "old"
    assert not os.path.exists(final + ".replaced")
    # and the fallback path as a whole, where the swap is unsupported
    monkeypatch.setattr(manager, "_exchange", lambda a, b: False)
    manager._move_into_place(final + ".partial", final)
    assert open(os.path.join(final, STATE_FILE)).read() == "new"
    assert sorted(os.listdir(root)) == ["latest", "step00000004"]
