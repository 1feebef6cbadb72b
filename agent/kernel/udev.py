"""udev events on the asyncio loop, and the udev database at start-up; the only module importing pyudev.

The monitor listens on udev's netlink group (events *after* the rules ran, so
``DM_NAME``, ``DM_UUID``, ``MPATH_DEVICE_READY``, ``DM_UDEV_DISABLE_OTHER_RULES_FLAG``
are there), filtered in the kernel to ``block``/``disk`` and ``scsi``/``scsi_device``.
pyudev has no asyncio support; its ``Monitor.fileno()`` plus non-blocking
``poll(0)`` is what ``loop.add_reader`` needs: on readability, drain until
``poll`` returns None.

Nothing here classifies events: every property comes through as the udev
database has it (``DM_ACTION``, ``DM_PATH``, ``SDEV_UA``, ...).

Errors::

    SwitchAgentError
     └── UdevError               the udev monitor failed
          └── UdevEventsLostError  the netlink socket overflowed (ENOBUFS): events were dropped,
                                   re-read the state (enumerate_existing) and carry on
"""

from __future__ import annotations

import asyncio
import errno
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

MONITOR_FILTERS: tuple[tuple[str, str], ...] = (("block", "disk"), ("scsi", "scsi_device"))
"""(subsystem, devtype) pairs the monitor passes; the kernel ORs the filters."""


class UdevError(SwitchAgentError):
    """The udev monitor could not deliver events; ``errno`` as the socket reported it."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        self.errno = errno_
        super().__init__(message)


class UdevEventsLostError(UdevError):
    """The netlink receive buffer overflowed (ENOBUFS): some events are gone for good.

    The monitor keeps running; a consumer re-reads current state with
    ``enumerate_existing()`` and goes on iterating.
    """


@dataclass(frozen=True)
class UdevEvent:
    """One udev event (or, with ``action`` None, one device as the udev database has it now)."""

    action: str | None
    """``add``, ``change``, ``remove``, ``move``, ``online``, ``offline``, ``bind``,
    ``unbind``; None for a device listed by ``enumerate_existing()``."""
    subsystem: str
    devtype: str | None
    sys_name: str
    """Kernel name: ``dm-3``, ``sdb``, ``2:0:0:0``."""
    sys_path: str
    device_node: str | None
    """``/dev/dm-3``, ``/dev/sdb``; None for a scsi_device."""
    properties: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    """Every udev property, read-only (``ACTION``, ``DEVNAME``, ``DM_UUID``, ``SDEV_UA`` ...)."""
    seqnum: int | None = None
    """The kernel's uevent sequence number (``SEQNUM``), None for enumerated devices."""

    def __post_init__(self) -> None:
        if not isinstance(self.properties, types.MappingProxyType):
            object.__setattr__(self, "properties", types.MappingProxyType(dict(self.properties)))

    def get(self, key: str, default: str | None = None) -> str | None:
        """One property, or ``default``."""
        return self.properties.get(key, default)


class UdevSource(Protocol):
    """What ``UdevMonitor`` drives: a selectable fd and a non-blocking poll.

    ``PyudevSource`` is the real one; tests use ``tests.unit.fakes_udev.FakeUdevSource``.
    """

    def fileno(self) -> int:
        """A file descriptor that becomes readable when an event is waiting."""

    def poll(self) -> UdevEvent | None:
        """The next waiting event, None at once when there is none; raises UdevError."""

    def enumerate_existing(self) -> list[UdevEvent]:
        """Every device the source's start-up listing covers (action None)."""

    def close(self) -> None:
        """Stop listening and release the fd."""


def event_from_device(device: Any) -> UdevEvent:
    """Convert a pyudev ``Device`` (from a monitor or an enumeration) to a ``UdevEvent``."""
    props = {str(k): str(v) for k, v in device.properties.items()}
    seqnum = props.get("SEQNUM")
    return UdevEvent(
        action=device.action,
        subsystem=device.subsystem,
        devtype=device.device_type,
        sys_name=device.sys_name,
        sys_path=device.sys_path,
        device_node=device.device_node,
        properties=props,
        seqnum=int(seqnum) if seqnum and seqnum.isdigit() and device.action else None,
    )


def enumerate_existing(
    *, subsystem: str = "block", devtype: str | None = "disk", sys_name: str | None = "dm-*", context: Any = None
) -> list[UdevEvent]:
    """The devices udev knows now, with their database properties (default: every dm disk).

    ``sys_name`` is a glob (libudev matches with fnmatch); None lists every
    device of the subsystem. Reads ``/run/udev/data``: quick, but blocking.
    """
    import pyudev

    ctx = context if context is not None else pyudev.Context()
    LOG.debug("udev enumerate subsystem=%s devtype=%s sys_name=%s", subsystem, devtype, sys_name)
    enum = ctx.list_devices(subsystem=subsystem)
    if devtype is not None:
        enum = enum.match_property("DEVTYPE", devtype)
    if sys_name is not None:
        enum = enum.match_sys_name(sys_name)
    return sorted((event_from_device(d) for d in enum), key=lambda e: e.sys_path)


class PyudevSource:
    """The real source: a pyudev netlink monitor with the kernel-side filters.

    ``netlink="udev"`` (the default) delivers events after udev's rules ran,
    with the udev database's properties; ``netlink="kernel"`` delivers the
    kernel's own uevents as they happen, seconds earlier under load, with the
    uevent's properties only (``DEVNAME``, ``MAJOR``, ``MINOR``, no ``DM_*``).
    """

    def __init__(
        self, filters: Iterable[tuple[str, str | None]] = MONITOR_FILTERS, *, context: Any = None,
        receive_buffer_bytes: int | None = None, netlink: str = "udev",
    ) -> None:
        import pyudev

        self._context = context if context is not None else pyudev.Context()
        LOG.debug("udev monitor: opening netlink %r source", netlink)
        self._monitor = pyudev.Monitor.from_netlink(self._context, source=netlink)
        for subsystem, devtype in filters:
            self._monitor.filter_by(subsystem, devtype)
        if receive_buffer_bytes is not None:
            # Needs CAP_NET_ADMIN (SO_RCVBUFFORCE); the agent runs as root.
            self._monitor.set_receive_buffer_size(receive_buffer_bytes)
        self._monitor.start()

    def fileno(self) -> int:
        """The netlink socket's fd."""
        fd: int = self._monitor.fileno()
        return fd

    def poll(self) -> UdevEvent | None:
        """The next event, or None if none is waiting."""
        try:
            device = self._monitor.poll(0)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise UdevEventsLostError("udev netlink socket overflowed: events lost", exc.errno) from exc
            raise UdevError(f"udev monitor receive failed: {exc}", exc.errno) from exc
        return None if device is None else event_from_device(device)

    def enumerate_existing(self) -> list[UdevEvent]:
        """Every dm disk udev knows now."""
        return enumerate_existing(context=self._context)

    def close(self) -> None:
        """Drop the monitor (pyudev closes the socket when the monitor is freed)."""
        self._monitor = None


class UdevMonitor:
    """Delivers sources' events to asyncio consumers, in order, through an async iterator.

    ``start()`` registers each source's fd with the running loop; each time one
    is readable that source is drained into the one queue (events keep their
    order within a source). ``async for event in
    monitor`` (or ``await monitor.get()``) takes them out. An overflow shows
    up as ``UdevEventsLostError`` raised from ``get()`` in the place of the
    lost events; the monitor keeps running after it. Any other UdevError
    is raised once and the monitor stops watching (make a new one).
    """

    def __init__(self, source: UdevSource | None = None, *more: UdevSource) -> None:
        self.source: UdevSource = source if source is not None else PyudevSource()
        self.sources: tuple[UdevSource, ...] = (self.source, *more)
        self._queue: asyncio.Queue[UdevEvent | UdevError] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []

    def start(self) -> None:
        """Start watching every source's fd on the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for source in self.sources:
            fd = source.fileno()
            self._fds.append(fd)
            self._loop.add_reader(fd, self._drain, source)
            self._drain(source)  # anything that arrived before the reader was set

    def stop(self) -> None:
        """Stop watching and close the sources. Events already queued can still be taken."""
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._loop = None
        self._fds = []
        for source in self.sources:
            source.close()

    def _drain(self, source: UdevSource | None = None) -> None:
        source = source or self.source
        while True:
            try:
                event = source.poll()
            except UdevError as exc:
                LOG.warning("%s", exc)
                self._queue.put_nowait(exc)
                if isinstance(exc, UdevEventsLostError):
                    continue  # the socket is usable again after reporting the overflow
                # Anything else would repeat on every wake-up: stop watching this source.
                if self._loop is not None:
                    self._loop.remove_reader(source.fileno())
                return
            if event is None:
                return
            LOG.debug("udev %s %s/%s %s", event.action, event.subsystem, event.devtype, event.sys_name)
            self._queue.put_nowait(event)

    def pending(self) -> int:
        """How many events are queued and not yet taken."""
        return self._queue.qsize()

    async def get(self) -> UdevEvent:
        """The next event; raises UdevError (e.g. UdevEventsLostError) where it happened."""
        item = await self._queue.get()
        if isinstance(item, UdevError):
            raise item
        return item

    def __aiter__(self) -> UdevMonitor:
        return self

    async def __anext__(self) -> UdevEvent:
        return await self.get()

    async def __aenter__(self) -> UdevMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "MONITOR_FILTERS",
    "PyudevSource",
    "UdevError",
    "UdevEvent",
    "UdevEventsLostError",
    "UdevMonitor",
    "UdevSource",
    "enumerate_existing",
    "event_from_device",
]
