"""What a log message is about, as journal fields: the LUN (WWID, MPATH) and the member (MEMBER).

Two ways in, both ending as attributes of the log record whose names are
all capitals (logging's own attributes never are), which agent.journal sends
as fields of their own:

- per call, with logging's `extra=`: ``LOG.info(..., extra=logfields.member(name))``;
- per task, with ``about()``: the daemon runs each LUN's reconcile and path
  healing inside ``about(WWID=...)``, so every message of that work, from
  any module and from the worker threads asyncio.to_thread starts (they
  copy the context), carries the LUN without each call naming it.

`journalctl -u switch-agent WWID=<wwid>` is then one volume's story.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from typing import Iterator

_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
"""A journal field name (no leading '_': those are journald's trusted fields)."""
_CURRENT: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "switch_agent_log_fields", default=())


def is_field(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _checked(fields: dict[str, str | None]) -> dict[str, str]:
    for name in fields:
        if not is_field(name):
            raise ValueError(f"{name!r} is not a journal field name (capitals, digits, '_')")
    return {name: value for name, value in fields.items() if value is not None}


@contextlib.contextmanager
def about(**fields: str | None) -> Iterator[None]:
    """Every message logged inside (in this task, and in tasks and threads it starts) carries `fields`."""
    token = _CURRENT.set(tuple({**dict(_CURRENT.get()), **_checked(fields)}.items()))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def add(**fields: str | None) -> None:
    """Add fields to the current ``about()`` for the rest of it (learnt on the way: the multipath name)."""
    _CURRENT.set(tuple({**dict(_CURRENT.get()), **_checked(fields)}.items()))


def replace(**fields: str | None) -> None:
    """The current task's fields from here on are `fields` alone (for a task of its own: asyncio gave
    it a copy of its creator's context, and what that held is about something else)."""
    _CURRENT.set(tuple(_checked(fields).items()))


def current() -> dict[str, str]:
    return dict(_CURRENT.get())


def lun(wwid: str, mpath: str | None = None) -> dict[str, str]:
    """`extra=` for a message about a LUN outside its reconcile."""
    return _checked({"WWID": wwid, "MPATH": mpath})


def member(name: str | None) -> dict[str, str]:
    """`extra=` for a message about one array member (nothing when the member is not known)."""
    return _checked({"MEMBER": name})


def of(record: logging.LogRecord) -> dict[str, str]:
    """The record's fields: the context's, then its own `extra=` ones (which win)."""
    fields = current()
    fields.update((name, str(value)) for name, value in vars(record).items() if is_field(name))
    return fields
