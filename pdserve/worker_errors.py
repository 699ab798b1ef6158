"""Which role a failed worker call blames: part of the DecodeWorker contract.

A decode worker that fails a call because of a prefill worker (every candidate
unreachable, silent or full, or a prefill-side status it passes on) says so in the
call's trailing metadata, ``pdserve-failed-role: prefill``. A call without it
failed on the decode worker itself (its own admission, its own death). The router
reads it to tell "every decode worker is full" from "the prefill worker is full",
and to move only requests whose decode worker died.
"""

from __future__ import annotations

from collections.abc import Iterable

FAILED_ROLE_KEY = "pdserve-failed-role"
ROLES = ("decode", "prefill")


def failed_role_metadata(role: str) -> tuple[tuple[str, str], ...]:
    """Trailing metadata blaming ``role``."""
    assert role in ROLES, role
    return ((FAILED_ROLE_KEY, role),)


def failed_role(trailing: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The role a call's trailing metadata blames; ``decode`` when it names none (or
    something unknown: a peer's word is checked, not trusted)."""
    for key, value in trailing or ():
        if key == FAILED_ROLE_KEY and value in ROLES:
            return str(value)
    return "decode"
