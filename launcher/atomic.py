"""Writing an output folder so that nothing half-written ever sits under its final name."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_dir(out: str):
    """Yields a temporary folder beside `out`; on success it replaces `out` (an old `out` is moved
    aside first and removed only after the new one is in place), on failure it is removed."""
    out = out.rstrip("/")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
