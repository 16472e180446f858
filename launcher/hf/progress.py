"""Progress of long inference jobs (`encdec generate`, `encdec eval`), on stderr.

On a terminal: a tqdm bar (count, rate, ETA). Elsewhere (a Slurm log, a pipe), where a bar's
carriage returns would fill the file: one plain line every `every_s` seconds
(`generate: 12,000/100,000 lines (12%), 850 lines/s, ETA 1m32s`) and a last line if any was
printed. Nothing with quiet=True. The total may be unknown (stdin): no percentage or ETA then.
"""
from __future__ import annotations

import sys
import time


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str, quiet: bool = False, every_s: float = 30.0,
                 stream=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.done, self.t0, self._last, self._printed = 0, time.monotonic(), time.monotonic(), False
        self.bar = None
        self.quiet = quiet
        if not quiet and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, mininterval=0.5)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.monotonic() - self._last >= self.every_s:
            self._line()

    def line(self) -> str:
        el = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / el
        if self.total:
            eta = f", ETA {_clock((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
            return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:,.1f} {self.unit}/s{eta}")
        return f"{self.desc}: {self.done:,} {self.unit}, {rate:,.1f} {self.unit}/s"

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last, self._printed = time.monotonic(), True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self._printed:
            self._line()
            self._printed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
