"""device-mapper as the orchestrator uses it: whole operations, awaitable, on the threads they need.

agent.kernel.dm.DeviceMapper is one blocking method per ioctl and holds no
policy. Above it, this facade offers what the orchestrator does with a
device (create and load, swap a live table, message, remove), always
addressed by uuid, and owns the threads those calls block: the loop's
default pool for quick ioctls, and threads of its own for calls that wait
for udev (a new top device's node: up to 30 s while udev works through many
LUNs appearing at once; in the default pool a few of them stalled every
other LUN's dm calls).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
from typing import Any, Callable, Iterable, Protocol, Sequence

from agent.stack import DeviceSpec
from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

UDEV_WAIT_THREADS = 64
"""One udev wait per LUN at most (its lock), so few of these threads exist in practice."""


class DeviceLeftSuspendedError(SwitchAgentError):
    """A table swap failed and the device could not be resumed either: its I/O waits."""

    def __init__(self, uuid: str, cause: SwitchAgentError) -> None:
        self.uuid = uuid
        self.cause = cause
        super().__init__(f"{uuid} is left SUSPENDED (its I/O waits): resuming it failed: {cause}; "
                         f"`dmsetup resume --uuid {uuid}` by hand")


class SyncDeviceMapper(Protocol):
    """The blocking ioctl layer this facade drives: agent.kernel.dm.DeviceMapper, or a fake."""

    def list_devices(self) -> Sequence[Any]: ...
    def device_info(self, name: str | None = None, *, uuid: str | None = None) -> Any: ...
    def device_create(self, name: str, uuid: str) -> Any: ...
    def table_load(self, name: str | None, targets: Sequence[Any], *, uuid: str | None = None) -> Any: ...
    def table_clear(self, name: str | None = None, *, uuid: str | None = None) -> Any: ...
    def table_status(self, name: str | None = None, *, uuid: str | None = None) -> list[Any]: ...
    def device_suspend(self, name: str | None = None, *, uuid: str | None = None) -> Any: ...
    def device_resume(self, name: str | None = None, *, uuid: str | None = None, udev_flags: int = 0,
                      noflush: bool = False, wait_for_udev: bool = True) -> Any: ...
    def device_remove(self, name: str | None = None, *, uuid: str | None = None,
                      wait_for_udev: bool = True) -> Any: ...
    def target_message(self, name: str | None, sector: int, message: str, *,
                       uuid: str | None = None) -> Any: ...


class AsyncDeviceMapper:
    """Whole device operations for the event loop; every device named by its uuid."""

    def __init__(self, dm: SyncDeviceMapper) -> None:
        self.dm = dm
        self._udev_waits = concurrent.futures.ThreadPoolExecutor(max_workers=UDEV_WAIT_THREADS,
                                                                 thread_name_prefix="udev-wait")

    async def list_devices(self) -> Sequence[Any]:
        return await asyncio.to_thread(self.dm.list_devices)

    async def create_and_load(self, spec: DeviceSpec) -> str:
        """Create a hidden device (leg or switch), load and resume its table; its major:minor.

        On failure the half-made device is removed and the error raised.

        Legs and switch are used by major:minor and hidden from other rules:
        nothing waits on their /dev/mapper nodes, so neither do we.
        """
        dm = self.dm
        await asyncio.to_thread(dm.device_create, spec.name, spec.uuid)
        try:
            await asyncio.to_thread(dm.table_load, None, list(spec.targets), uuid=spec.uuid)
            await asyncio.to_thread(dm.device_resume, uuid=spec.uuid, udev_flags=spec.udev_flags,
                                    wait_for_udev=False)
            info = await asyncio.to_thread(dm.device_info, uuid=spec.uuid)
        except SwitchAgentError:
            await self.remove([spec.uuid])
            raise
        return f"{info.major}:{info.minor}"

    async def create_visible(self, name: str, uuid: str, targets: Sequence[Any], *,
                             before_udev_wait: Callable[[], None] = lambda: None) -> None:
        """Create a device users open by name (the top), waiting until udev has made its node.

        `before_udev_wait` runs once the table is loaded, before the wait. On
        failure the half-made device is removed and the error raised.
        """
        dm = self.dm
        await asyncio.to_thread(dm.device_create, name, uuid)
        try:
            await asyncio.to_thread(dm.table_load, None, list(targets), uuid=uuid)
            before_udev_wait()
            await self._waiting_for_udev(dm.device_resume, uuid=uuid)
        except SwitchAgentError:
            await self.remove([uuid], wait_for_udev=True)
            raise

    async def swap_table(self, uuid: str, targets: Sequence[Any], *, udev_flags: int = 0,
                         noflush: bool = False) -> None:
        """Load and swap in a live device's new table; never leaves it suspended (see swap_table)."""
        await _through(swap_table, self.dm, uuid, list(targets), udev_flags=udev_flags, noflush=noflush)

    async def message(self, uuid: str, message: str) -> None:
        await asyncio.to_thread(self.dm.target_message, None, 0, message, uuid=uuid)

    async def remove(self, uuids: Iterable[str], *, wait_for_udev: bool = False) -> None:
        """Best effort: try every device, log every failure.

        Switches and legs are hidden from udev's rules and used by major:minor
        only, so their removal does not wait for udev unless asked.
        """
        for uuid in uuids:
            try:
                if wait_for_udev:
                    await self._waiting_for_udev(self.dm.device_remove, uuid=uuid, wait_for_udev=True)
                else:
                    await asyncio.to_thread(self.dm.device_remove, uuid=uuid, wait_for_udev=False)
            except SwitchAgentError as exc:
                LOG.warning("could not remove %s: %s", uuid, exc)

    async def statuses(self, legs: Sequence[DeviceSpec]) -> dict[str, list[Any] | SwitchAgentError]:
        """Each leg's DM_TABLE_STATUS targets, or the error reading it gave, by leg name.

        One hop to a worker for all of them: a hop costs more CPU than the ioctl.
        """
        return await asyncio.to_thread(_statuses, self.dm, legs)

    async def resume_suspended(self, uuids: Sequence[str]) -> dict[str, SwitchAgentError]:
        """Resume (their live tables) those of `uuids` that are suspended; the ones that stay so and why."""
        return await asyncio.to_thread(_resume_suspended, self.dm, uuids)

    async def _waiting_for_udev(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # In the caller's context, as to_thread runs it: its log messages keep their LUN's fields.
        return await asyncio.get_running_loop().run_in_executor(
            self._udev_waits, functools.partial(contextvars.copy_context().run, call, *args, **kwargs))


def swap_table(dm: SyncDeviceMapper, uuid: str, targets: list[Any], *, udev_flags: int = 0,
               noflush: bool = False) -> None:
    """Load `targets` into a live device and swap them in (one resume: suspend, swap, resume).

    Whatever fails, the device is not left suspended: a failed swap leaves it
    suspended with its new table dropped (dm-ioctl.c do_resume), so the old
    table is resumed. If even that fails, DeviceLeftSuspendedError says so.
    Blocking: run it in a worker thread, to its end (`_through`).
    """
    dm.table_load(None, targets, uuid=uuid)
    try:
        dm.device_resume(uuid=uuid, udev_flags=udev_flags, noflush=noflush, wait_for_udev=False)
    except SwitchAgentError:
        resume_as_it_was(dm, uuid, udev_flags=udev_flags, noflush=noflush)
        raise


def resume_as_it_was(dm: SyncDeviceMapper, uuid: str, *, udev_flags: int = 0, noflush: bool = False) -> None:
    """Drop any inactive table and resume the live one; DeviceLeftSuspendedError when the kernel refuses."""
    try:
        dm.table_clear(uuid=uuid)
    except SwitchAgentError as exc:
        LOG.debug("%s: clearing the inactive table: %s", uuid, exc)
    try:
        dm.device_resume(uuid=uuid, udev_flags=udev_flags, noflush=noflush, wait_for_udev=False)
    except SwitchAgentError as exc:
        LOG.error("%s: left suspended: %s", uuid, exc)
        raise DeviceLeftSuspendedError(uuid, exc) from exc


def _resume_suspended(dm: SyncDeviceMapper, uuids: Sequence[str]) -> dict[str, SwitchAgentError]:
    stuck: dict[str, SwitchAgentError] = {}
    for uuid in uuids:
        try:
            if not dm.device_info(uuid=uuid).suspended:
                continue
            LOG.warning("%s: found suspended; resuming its live table", uuid)
            resume_as_it_was(dm, uuid)
        except SwitchAgentError as exc:
            stuck[uuid] = exc
    return stuck


def _statuses(dm: SyncDeviceMapper, legs: Sequence[DeviceSpec]) -> dict[str, list[Any] | SwitchAgentError]:
    statuses: dict[str, list[Any] | SwitchAgentError] = {}
    for leg in legs:
        try:
            statuses[leg.name] = dm.table_status(uuid=leg.uuid)
        except SwitchAgentError as exc:
            statuses[leg.name] = exc
    return statuses


async def _through(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking call in a worker thread that runs to its end even when the caller is cancelled.

    A table swap cancelled half-way (SIGTERM mid-reconcile) must still resume
    its device: the thread goes on, and asyncio.run joins it before the daemon exits.
    """
    work = asyncio.ensure_future(asyncio.to_thread(call, *args, **kwargs))
    work.add_done_callback(_log_unawaited_failure)
    return await asyncio.shield(work)


def _log_unawaited_failure(work: asyncio.Future[Any]) -> None:
    if not work.cancelled() and work.exception() is not None:
        LOG.debug("kernel call finished with %s", work.exception())
