"""A small progress bar on stderr (no dependency), for the command-line tool."""

import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress bar, redrawn in place with carriage returns.

    Disabled (draws nothing) when `enabled` is False or the stream is not a terminal, so
    logs and pipes stay clean. Use as a context manager; `update(n, status)` advances it.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None,
                 width: int = 24):
        self.total, self.desc, self.width = max(int(total), 1), desc, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and self.stream.isatty()
        self.count, self.status, self._start, self._last = 0, "", time.perf_counter(), 0.0

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1, status: str | None = None) -> None:
        self.count = min(self.count + n, self.total)
        if status is not None:
            self.status = status
        self._draw(force=self.count == self.total)

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """Print a line above the bar (the bar is redrawn under it)."""
        out = sys.stdout if stream is None else stream
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
        out.write(line + "\n")
        out.flush()
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:  # redraw at most 10 times a second
            return
        self._last = now
        done = self.width * self.count // self.total
        bar = "#" * done + "-" * (self.width - done)
        elapsed = now - self._start
        self.stream.write(
            f"\r\033[K{self.desc} [{bar}] {self.count}/{self.total} {elapsed:5.1f}s {self.status}"
        )
        self.stream.flush()
