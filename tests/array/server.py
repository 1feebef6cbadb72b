"""The emulator server: one process serving every member's TCMU ring and the control socket.

One thread runs a selector over the uio devices (one per member) and the
control socket, so ring service never waits on anything but the store.
Control operations that write configfs (adding or deleting a member's LIO
objects, teardown) run on a worker thread: deleting a TPG waits for its
outstanding commands, which only this loop can complete.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import socket
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from protocol.scsi import ScsiStatus, Sense, SenseKey, encode_sense
from tests.array import control
from tests.array.errors import ArrayStateError, ControlError
from tests.array.lio import CONTROL, SMALL_RING_CONTROL, Chap, LioArray, load_modules
from tests.array.lu import LogicalUnit, LuIdentity
from tests.array.ring import Completion, RingCommand
from tests.array.store import SparseStore
from tests.array.uio import TcmuDevice, find_tcmu_device
from tests.array.volume import ArrayVolume

log = logging.getLogger("tests.array.server")

_INTERNAL_TARGET_FAILURE = encode_sense(Sense(SenseKey.HARDWARE_ERROR, 0x44, 0x00))


@dataclass(frozen=True)
class ServerConfig:
    """What `up` asked for."""

    run_dir: Path
    members: int
    layout: str
    size_bytes: int
    page_size_bytes: int
    seed: int
    volume_name: str = "vol0"
    luns: int = 1
    """Volumes served, each as LUN i of every member (vol0 is LUN 0); see ExtraLun."""
    chap: Chap | None = None
    """CHAP every member's TPG requires; None: no authentication."""
    member_portals: bool = True
    """False: no VPD 0xC1 (a protocol-1.0 array, whose sessions a host cannot manage)."""
    keep_data: bool = False
    """True: serve the data already in the data directory (an array that survives a host's reboot)."""


@dataclass
class ExtraLun:
    """Volume vol<i> as LUN i (i >= 1) of every member: its own map, data, identity and rings.

    Only LUN 0 follows the control operations (move, resize, members); the
    others keep their geometry and map: they exist so an initiator sees many
    LUNs of the same array at once (the agent's many-LUN benchmark).
    """

    index: int
    name: str
    volume: ArrayVolume
    store: SparseStore
    identity: LuIdentity
    lu: LogicalUnit


class ArrayServer:
    """Owns the volume, the store, the LIO objects and the open uio devices."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.volume = ArrayVolume(size_bytes=config.size_bytes, page_size_bytes=config.page_size_bytes,
                                  members=config.members, layout=config.layout, seed=config.seed)
        data_dir = Path(os.environ.get("SWEMU_DATA_DIR", config.run_dir / "data"))
        if not config.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)  # a new volume reads as zeros
        self.store = SparseStore(data_dir, config.size_bytes)
        self.identity = LuIdentity.for_volume(config.volume_name)
        self.lu = LogicalUnit(self.volume, self.store, self.identity, member_portals=config.member_portals)
        if config.luns < 1:
            raise ArrayStateError(f"LUN count must be at least 1, got {config.luns}")
        self.lio = LioArray(volume=config.volume_name, serial=self.identity.serial,
                            control=SMALL_RING_CONTROL if config.luns > 1 else CONTROL,
                            chap=config.chap)
        self.devices: dict[int, TcmuDevice] = {}
        self.extra_luns = [self._extra_lun(i, data_dir) for i in range(1, config.luns)]
        self.extra_devices: dict[tuple[int, int], TcmuDevice] = {}
        self.selector = selectors.DefaultSelector()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lio")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._in_flight: list[tuple[Future, socket.socket, Callable[[Any], Any]]] = []
        self._stopping = False
        self.listener: socket.socket | None = None

    def _extra_lun(self, index: int, data_dir: Path) -> ExtraLun:
        c = self.config
        volume = ArrayVolume(size_bytes=c.size_bytes, page_size_bytes=c.page_size_bytes, members=c.members,
                             layout=c.layout, seed=c.seed + index)
        store = SparseStore(data_dir / f"lun{index}", c.size_bytes)
        identity = LuIdentity.for_volume(f"vol{index}")
        lu = LogicalUnit(volume, store, identity, member_portals=c.member_portals)
        return ExtraLun(index, f"vol{index}", volume, store, identity, lu)

    def _single_lun_only(self, what: str) -> None:
        if self.extra_luns:
            raise ArrayStateError(f"{what} is supported with one LUN only (this array serves {self.config.luns})")

    # -- start-up -------------------------------------------------------------------

    def start(self) -> None:
        """Create the LIO objects, open every member's uio device, listen for control."""
        load_modules()
        self.lio.create_target()
        for member in self.volume.members:
            self._attach(member.number, self._create_member(member.number))
        for extra in self.extra_luns:
            for member in self.volume.members:
                config = self.lio.add_lun(member.number, extra.index, extra.name, extra.identity.serial,
                                          self.volume.size_bytes)
                device = TcmuDevice(find_tcmu_device(config))
                key = (extra.index, member.number)
                self.extra_devices[key] = device
                self.selector.register(device.fd, selectors.EVENT_READ,
                                       lambda e=extra, n=member.number: self._service_extra(e, n))
                self._service_extra(extra, member.number)
            log.info("LUN %d (%s): wwid %s on %d members", extra.index, extra.name, extra.identity.wwid,
                     len(self.volume.members))
        path = control.socket_path(self.config.run_dir)
        path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._finish_work)
        log.info("serving %d members, wwid %s, %d bytes, page %d bytes, layout %s",
                 len(self.devices), self.identity.wwid, self.volume.size_bytes,
                 self.volume.page_size_bytes, self.volume.layout)

    def _create_member(self, number: int) -> TcmuDevice:
        """LIO objects and the open uio device of one member (safe on the worker thread)."""
        config = self.lio.add_member(number, self.volume.size_bytes)
        device = TcmuDevice(find_tcmu_device(config))
        log.info("member m%d: %s (%s), ring %d bytes", number, device.entry.device, config,
                 device.ring.cmdr_size)
        return device

    def _attach(self, number: int, device: TcmuDevice) -> None:
        self.devices[number] = device
        self.selector.register(device.fd, selectors.EVENT_READ, lambda: self._service(number))
        self._service(number)  # anything queued before we registered

    # -- ring service -----------------------------------------------------------------

    def _service(self, number: int) -> None:
        device = self.devices.get(number)
        if device is not None:
            device.service(lambda command: self._execute(number, command))

    def _service_extra(self, extra: ExtraLun, number: int) -> None:
        device = self.extra_devices.get((extra.index, number))
        if device is not None:
            device.service(lambda command: self._execute(number, command, extra.lu))

    def _execute(self, number: int, command: RingCommand, lu: LogicalUnit | None = None) -> Completion:
        lu = lu or self.lu
        try:
            data_out = command.gather() if lu.wants_data_out(command.cdb) else b""
            result = lu.handle(number, command.cdb, data_out)
        except Exception:  # a bug must cost one command, not the array
            log.error("m%d: CDB %s failed:\n%s", number, command.cdb.hex(), traceback.format_exc())
            return Completion(ScsiStatus.CHECK_CONDITION, b"", _INTERNAL_TARGET_FAILURE)
        if result.status != ScsiStatus.GOOD:
            log.debug("m%d: CDB %s -> status %d sense %s", number, command.cdb.hex(), result.status,
                      result.sense[:18].hex())
        return Completion(result.status, result.data_in, result.sense)

    # -- main loop ----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until a shutdown request has been carried out."""
        while not (self._stopping and not self._in_flight):
            for key, _events in self.selector.select(timeout=1.0):
                key.data()
        log.info("stopped")

    # -- control ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        # The CLI sends its one line at once; a short timeout bounds a stuck client.
        conn.settimeout(5.0)
        try:
            message = json.loads(control.read_line(conn))
            op, args = message["op"], message.get("args", {})
        except (ControlError, ValueError, KeyError, OSError) as exc:
            self._reply(conn, {"ok": False, "error": str(exc), "type": type(exc).__name__})
            return
        log.info("control: %s %s", op, args)
        try:
            handler = self._operations()[op]
        except KeyError:
            self._reply(conn, {"ok": False, "error": f"unknown operation {op!r}", "type": "ControlError"})
            return
        try:
            outcome = handler(**args)
        except Exception as exc:  # reported to the CLI, never fatal to the server
            log.warning("control %s failed: %s", op, exc)
            self._reply(conn, {"ok": False, "error": str(exc), "type": type(exc).__name__})
            return
        if isinstance(outcome, _Deferred):
            self._in_flight.append((self.worker.submit(outcome.work), conn, outcome.finish))
            self._in_flight[-1][0].add_done_callback(lambda _f: os.write(self._wake_w, b"."))
        else:
            self._reply(conn, {"ok": True, "result": outcome})

    def _finish_work(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        still = []
        for future, conn, finish in self._in_flight:
            if not future.done():
                still.append((future, conn, finish))
                continue
            try:
                outcome = finish(future.result())
            except Exception as exc:
                log.warning("control work failed: %s", exc)
                self._reply(conn, {"ok": False, "error": str(exc), "type": type(exc).__name__})
                continue
            if isinstance(outcome, _Deferred):  # a further step on the worker
                next_future = self.worker.submit(outcome.work)
                next_future.add_done_callback(lambda _f: os.write(self._wake_w, b"."))
                still.append((next_future, conn, outcome.finish))
            else:
                self._reply(conn, {"ok": True, "result": outcome})
        self._in_flight = still

    @staticmethod
    def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.sendall(control.encode(message))
        except OSError as exc:
            log.warning("control reply lost: %s", exc)
        finally:
            conn.close()

    def _operations(self) -> dict[str, Callable[..., Any]]:
        return {
            "status": self._op_status,
            "info": self._op_info,
            "stats": self._op_stats,
            "move": self._op_move,
            "resize": self._op_resize,
            "add-member": self._op_add_member,
            "retire-member": self._op_retire_member,
            "delete-member": self._op_delete_member,
            "corrupt-next-map": self._op_corrupt,
            "owner": self._op_owner,
            "shutdown": self._op_shutdown,
        }

    def _op_status(self) -> dict[str, Any]:
        return {"ready": True, "pid": os.getpid(), "serving": sorted(self.devices)}

    def _op_info(self) -> dict[str, Any]:
        info = self.volume.describe()
        info.update(wwid=self.identity.wwid, serial=self.identity.serial, iqn=self.lio.iqn,
                    volume=self.config.volume_name, run_dir=str(self.config.run_dir),
                    retired=sorted(self.volume.retired), pid=os.getpid(),
                    chap_user=self.config.chap.userid if self.config.chap else None,
                    member_portals=self.config.member_portals,
                    luns=[{"lun": 0, "volume": self.config.volume_name, "wwid": self.identity.wwid}]
                    + [{"lun": e.index, "volume": e.name, "wwid": e.identity.wwid} for e in self.extra_luns])
        for member in info["members"]:  # type: ignore[union-attr]
            device = self.devices.get(member["number"])
            member["uio"] = device.entry.device if device else None
        return info

    def _op_stats(self, reset: bool = False) -> dict[str, Any]:
        everyone = self.volume.members + list(self.volume.retired.values())
        stats = {m.name: {"number": m.number, "member_id": m.member_id, **m.counters.as_dict(),
                          "retired": m.number in self.volume.retired}
                 for m in sorted(everyone, key=lambda m: m.number)}
        if reset:
            self.volume.reset_counters()
            for member in self.volume.retired.values():
                member.counters = type(member.counters)()
        return {"generation": self.volume.generation, "members": stats}

    def _op_move(self, fraction: float, to: int | None = None) -> dict[str, Any]:
        moved = self.volume.move_pages(float(fraction), to=None if to is None else int(to))
        return {"moved_pages": moved, "generation": self.volume.generation}

    def _op_resize(self, size: int) -> _Deferred | dict[str, Any]:
        self._single_lun_only("resize")
        size = int(size)
        self.volume.resize(size)
        self.store.resize(size)
        numbers = sorted(self.devices)
        result = {"size_bytes": size, "total_pages": self.volume.total_pages,
                  "generation": self.volume.generation}
        return _Deferred(lambda: [self.lio.set_size(n, size) for n in numbers], lambda _r: result)

    def _op_add_member(self, empty: bool = False) -> _Deferred:
        self._single_lun_only("add-member")
        member = self.volume.add_member(take_pages=not empty)

        def finish(device: TcmuDevice) -> dict[str, Any]:
            self._attach(member.number, device)
            return {"number": member.number, "member_id": member.member_id, "name": member.name,
                    "portal": f"{member.portal_ip}:3260", "generation": self.volume.generation}

        def work() -> TcmuDevice:
            try:
                return self._create_member(member.number)
            except Exception:
                self.volume.remove_member(member.number)
                self.volume.forget_member(member.number)
                raise

        return _Deferred(work, finish)

    def _op_retire_member(self, number: int) -> dict[str, Any]:
        self._single_lun_only("remove-member")
        number = int(number)
        if len(self.volume.members) < 2:
            raise ArrayStateError("cannot remove the last member")
        self.volume.remove_member(number)
        return {"number": number, "generation": self.volume.generation}

    def _op_delete_member(self, number: int) -> _Deferred:
        number = int(number)
        if number not in self.volume.retired:
            raise ArrayStateError(f"m{number} is not retired: run retire-member first")

        def close_device(_result: object) -> _Deferred:
            device = self.devices.pop(number, None)
            if device is not None:
                self.selector.unregister(device.fd)
                device.close()
            return _Deferred(lambda: self.lio.remove_member_storage(number), forget)

        def forget(_result: object) -> dict[str, Any]:
            self.volume.forget_member(number)
            return {"number": number, "deleted": True}

        return _Deferred(lambda: self.lio.remove_member_port(number), close_device)

    def _op_corrupt(self, kind: str, count: int = 1) -> dict[str, Any]:
        self.volume.corrupt_next_map(kind, int(count))
        return {"kind": kind, "count": int(count)}

    def _op_owner(self, offset: int) -> dict[str, Any] | None:
        offset = int(offset)
        member = self.volume.owner_of_offset(offset)
        page = offset // self.volume.page_size_bytes
        if member is None:
            return {"page": page, "member": None}
        return {"page": page, "number": member.number, "member_id": member.member_id,
                "name": member.name, "index": self.volume.index_of(member.number),
                "portal": f"{member.portal_ip}:3260"}

    def _op_shutdown(self) -> _Deferred:
        """Delete the target (worker), close the rings (here), delete the backstores (worker)."""
        numbers = sorted(self.devices) + sorted(set(self.volume.retired) - set(self.devices))

        def close_devices(_result: object) -> _Deferred:
            for device in [*self.devices.values(), *self.extra_devices.values()]:
                self.selector.unregister(device.fd)
                device.close()
            self.devices.clear()
            extras = sorted(self.extra_devices)
            self.extra_devices.clear()
            return _Deferred(lambda: [self.lio.remove_member_storage(n) for n in numbers]
                             + [self.lio.remove_lun_storage(f"vol{i}", n) for i, n in extras], done)

        def done(_result: object) -> dict[str, Any]:
            self.store.close()
            for extra in self.extra_luns:
                extra.store.close()
            self._stopping = True
            return {"stopped": True}

        return _Deferred(self.lio.delete_target, close_devices)

    def close(self) -> None:
        """Release the socket (the LIO objects go with `shutdown`)."""
        if self.listener is not None:
            self.listener.close()
            control.socket_path(self.config.run_dir).unlink(missing_ok=True)
        self.worker.shutdown(wait=True)


@dataclass(frozen=True)
class _Deferred:
    """A control operation's slow part (`work`, on the worker) and its follow-up (`finish`, on the loop)."""

    work: Callable[[], Any]
    finish: Callable[[Any], Any]


def run(config: ServerConfig) -> int:
    """The server process's main: set up, serve, and leave no half-built target behind on failure."""
    logging.basicConfig(level=os.environ.get("SWEMU_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    log.info("starting: pid %d, %s", os.getpid(), config)
    server = ArrayServer(config)
    try:
        server.start()
    except Exception:
        log.exception("start-up failed; removing what was created")
        try:
            for device in [*server.devices.values(), *server.extra_devices.values()]:
                device.close()
            server.lio.delete_target()
            for number in range(config.members):
                try:
                    server.lio.remove_member_storage(number)
                except Exception:
                    pass
                for extra in server.extra_luns:
                    try:
                        server.lio.remove_lun_storage(extra.name, number)
                    except Exception:
                        pass
        finally:
            server.close()
        return 1
    log.info("ready after %.1f s", time.monotonic() - started)
    (config.run_dir / "server.pid").write_text(f"{os.getpid()}\n")
    try:
        server.serve_forever()
    finally:
        server.close()
        (config.run_dir / "server.pid").unlink(missing_ok=True)
    return 0
