"""A minimal progress bar on stderr (a redrawn line on a terminal, start/end lines otherwise)."""

from __future__ import annotations

import sys
import time


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Bar:
    """Counts bytes (shown as KB/MB/GB) unless `unit` names what it counts (tokens, rows, ...)."""

    def __init__(self, label: str, total: int | None, quiet: bool = False, unit: str = "B"):
        self.label, self.total, self.done = label, total, 0
        self.unit = unit
        self.note = ""  # shown after the counts (e.g. a training loss)
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        if not quiet and not self.tty:
            print(f"{label} ({self.fmt(total)})" if total else label, file=sys.stderr, flush=True)

    def fmt(self, n: float) -> str:
        return _human(n) if self.unit == "B" else f"{n:,.0f} {self.unit}"

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.quiet or not self.tty or now - self.last < 0.1:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            line = (f"{self.label} [{bar:<30}] {frac:4.0%} {self.fmt(self.done)}/{self.fmt(self.total)} "
                    f"{self.fmt(rate)}/s ETA {eta:.0f}s")
        else:
            line = f"{self.label} {self.fmt(self.done)} {self.fmt(rate)}/s"
        if self.note:
            line += f" {self.note}"
        print("\r" + line[:160], end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.quiet:
            return
        if self.tty:
            print(f"\r{self.label} done, {self.fmt(self.done)} in {time.monotonic() - self.t0:.1f}s".ljust(120),
                  file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    return _human(n)
