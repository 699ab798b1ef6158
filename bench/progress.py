"""What a long ``pdserve bench`` run is doing, shown on stderr.

Every mode reports its work through a ``Progress``: one bar per unit of work
(a backend's runs, a target's workload, W4's open loop, W5's hand-offs) that
names what runs (workload, target, repeat) and shows elapsed and expected time;
open-loop bars also count requests sent / completed / failed. The bars go to
stderr only, so the stdout table and the JSON are the same with or without them.

Implementations, chosen by name (``make_progress``): ``tqdm`` (the default),
``quiet`` (``--quiet``: nothing) and ``recording`` (tests: keeps every event).

A bar's lifecycle: open (``Progress.bar``) → ``show``/``advance`` any number of
times → ``close`` (also on leaving its ``with`` block). Expected time is tqdm's
estimate from the rate so far; ``expected_s`` adds the least the work lasts when
the caller knows it (W4's open loop sends for ``--duration`` whatever the rate).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self


class Bar(Protocol):
    def show(self, what: str | None = None, **counts: int | str) -> None:
        """Name what runs now and/or update the counters beside the bar."""

    def advance(self, n: int = 1, **counts: int | str) -> None:
        """``n`` more units of work done (and the counters as they are now)."""

    def close(self) -> None: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Progress(Protocol):
    def bar(self, what: str, total: int | None, unit: str = "run",
            expected_s: float | None = None) -> Bar:
        """A bar for ``total`` units (None: unknown, elapsed time only)."""


class _BarBase:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pass


class _TqdmBar(_BarBase):
    def __init__(self, what: str, total: int | None, unit: str, expected_s: float | None):
        from tqdm import tqdm

        self._expected = f" (at least {_duration(expected_s)})" if expected_s else ""
        interactive = sys.stderr.isatty()
        # A log file gets a line every 10 s, a terminal a redraw every 0.5 s.
        self._bar = tqdm(total=total, unit=unit, desc=what + self._expected, file=sys.stderr,
                         mininterval=0.5 if interactive else 10.0, dynamic_ncols=True,
                         leave=True)

    def show(self, what: str | None = None, **counts: int | str) -> None:
        if what is not None:
            self._bar.set_description_str(what + self._expected, refresh=False)
        if counts:
            self._bar.set_postfix(counts, refresh=False)
        self._bar.update(0)  # redraws at most every mininterval

    def advance(self, n: int = 1, **counts: int | str) -> None:
        if counts:  # drawn with the count, so the two never disagree on screen
            self._bar.set_postfix(counts, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class TqdmProgress:
    def bar(self, what: str, total: int | None, unit: str = "run",
            expected_s: float | None = None) -> Bar:
        return _TqdmBar(what, total, unit, expected_s)


class _SilentBar(_BarBase):
    def show(self, what: str | None = None, **counts: int | str) -> None:
        pass

    def advance(self, n: int = 1, **counts: int | str) -> None:
        pass


class QuietProgress:
    def bar(self, what: str, total: int | None, unit: str = "run",
            expected_s: float | None = None) -> Bar:
        return _SilentBar()


@dataclass
class RecordedBar(_BarBase):
    what: str
    total: int | None
    expected_s: float | None
    done: int = 0
    shown: list[str] = field(default_factory=list)
    counts: dict[str, int | str] = field(default_factory=dict)
    closed: bool = False

    def show(self, what: str | None = None, **counts: int | str) -> None:
        if what is not None:
            self.shown.append(what)
        self.counts.update(counts)

    def advance(self, n: int = 1, **counts: int | str) -> None:
        self.done += n
        self.counts.update(counts)

    def close(self) -> None:
        self.closed = True


class RecordingProgress:
    """The fake: keeps every bar for a test to read."""

    def __init__(self) -> None:
        self.bars: list[RecordedBar] = []

    def bar(self, what: str, total: int | None, unit: str = "run",
            expected_s: float | None = None) -> Bar:
        b = RecordedBar(what, total, expected_s)
        self.bars.append(b)
        return b


PROGRESS: dict[str, Callable[[], Any]] = {
    "tqdm": TqdmProgress, "quiet": QuietProgress, "recording": RecordingProgress}


def make_progress(name: str) -> Progress:
    if name not in PROGRESS:
        raise ValueError(f"progress must be one of {sorted(PROGRESS)}, got {name!r}")
    return PROGRESS[name]()  # type: ignore[no-any-return]


def progress_for(quiet: bool) -> Progress:
    """``pdserve bench``'s choice: bars unless ``--quiet``."""
    return make_progress("quiet" if quiet else "tqdm")


class RequestTally:
    """Requests sent / completed / failed of a served run, shown on its bar (the
    bar advances per finished request)."""

    def __init__(self, bar: Bar) -> None:
        self._bar = bar
        self.sent = self.completed = self.failed = 0

    def on_sent(self) -> None:
        self.sent += 1
        self._show()

    def on_done(self, success: bool) -> None:
        if success:
            self.completed += 1
        else:
            self.failed += 1
        self._bar.advance(1, **self._counts())

    def _show(self) -> None:
        self._bar.show(None, **self._counts())

    def _counts(self) -> dict[str, int | str]:
        return {"sent": self.sent, "completed": self.completed, "failed": self.failed}


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
