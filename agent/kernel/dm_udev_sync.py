"""udev synchronisation for dm ioctls: libdm's cookie protocol over SysV semaphores.

``DM_DEV_SUSPEND`` (resume) and ``DM_DEV_REMOVE`` carry a udev cookie in
``event_nr`` exactly as libdm/dmsetup send it (see `UdevSync`), so
``55-dm.rules``/``10-dm.rules`` create ``/dev/mapper/<name>`` and honour the
``DM_UDEV_DISABLE_*`` flags (protocol.dmtable.DmUdevFlags), and the call
returns only after udev has finished with the event (``95-dm-notify.rules``
runs ``dmsetup udevcomplete``). The model is devicemapper-rs's
``dm_udev_sync.rs``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import time
from dataclasses import dataclass

from agent.kernel.dm_abi import DM_UEVENT_GENERATED_FLAG

LOG = logging.getLogger(__name__)

# udev cookie flags, high 16 bits of the cookie (lvm2 libdm/libdevmapper.h).
# The flags themselves are protocol.dmtable.DmUdevFlags.
DM_UDEV_FLAGS_SHIFT = 16
#: DM_COOKIE_MAGIC (lvm2 libdm/libdm-common.c): semaphore key = MAGIC << 16 | base.
DM_COOKIE_MAGIC = 0x0D4D


class _Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# <bits/ipc.h>, <bits/sem.h> (Linux)
_IPC_CREAT = 0o1000
_IPC_EXCL = 0o2000
_IPC_NOWAIT = 0o4000
_IPC_RMID = 0
_GETVAL = 12
_SETVAL = 16


@dataclass(frozen=True)
class UdevCookie:
    """A cookie for one ioctl: ``value`` goes into ``event_nr``; ``semid`` is None when not waiting."""

    value: int
    semid: int | None = None

    @property
    def base(self) -> int:
        """The low 16 bits: the semaphore's key is ``DM_COOKIE_MAGIC << 16 | base`` (0: flags only)."""
        return self.value & 0xFFFF


class UdevSync:
    """libdm's udev cookie protocol over SysV semaphores (lvm2 libdm/libdm-common.c).

    `begin` creates a semaphore with key ``(DM_COOKIE_MAGIC << 16) | base``
    for a random non-zero 16-bit base, sets it to 1 and increments it for the
    task; the cookie ``(udev_flags << 16) | base`` goes into ``event_nr``. The
    kernel puts it into the uevent as ``DM_COOKIE``; ``95-dm-notify.rules``
    runs ``dmsetup udevcomplete $DM_COOKIE``, which decrements. `complete`
    decrements once more if the kernel sent no uevent
    (``DM_UEVENT_GENERATED_FLAG`` clear), drops the initial 1, waits for zero
    (at most ``timeout`` seconds) and destroys the semaphore.

    If udev is not running (``/run/udev/control`` absent) or SysV semaphores
    are unavailable, the cookie carries the flags only (base 0), which
    ``udevcomplete`` accepts, and nothing is waited for. A timeout is logged at
    WARNING and does not raise: the ioctl itself has already succeeded.
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        udev_control: str = "/run/udev/control",
        rng: random.Random | None = None,
    ) -> None:
        self.timeout = timeout
        self.udev_control = udev_control
        self._rng = rng or random.SystemRandom()
        self._libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc
        self._libc.semtimedop.argtypes = [ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t,
                                          ctypes.POINTER(_Timespec)]
        self._libc.semop.argtypes = [ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t]

    def udev_running(self) -> bool:
        """True if udevd's control socket exists (what libdm and devicemapper-rs check)."""
        return os.path.exists(self.udev_control)

    def begin(self, udev_flags: int) -> UdevCookie:
        """Make the cookie for one ioctl, with a semaphore to wait on when udev runs."""
        flags_part = (udev_flags & 0xFFFF) << DM_UDEV_FLAGS_SHIFT
        if not self.udev_running():
            LOG.debug("udev not running: flags-only cookie %#x", flags_part)
            return UdevCookie(flags_part)
        err = 0
        for _ in range(16):
            base = self._rng.randint(1, 0xFFFF)
            semid = self._libc.semget((DM_COOKIE_MAGIC << 16) | base, 1,
                                      0o600 | _IPC_CREAT | _IPC_EXCL)
            if semid >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                break
        else:
            semid = -1
        if semid < 0:
            LOG.warning("udev cookie semaphore not created (%s): not waiting for udev",
                        os.strerror(err))
            return UdevCookie(flags_part)
        cookie = UdevCookie(flags_part | base, semid)
        try:
            self._check(self._libc.semctl(semid, 0, _SETVAL, ctypes.c_int(1)), "semctl SETVAL")
            self._semop(semid, +1, 0)
        except OSError as exc:
            LOG.warning("udev cookie %#x: %s: not waiting for udev", cookie.value, exc)
            self.cancel(cookie)
            return UdevCookie(flags_part)
        LOG.debug("udev cookie %#x (semid %d)", cookie.value, semid)
        return cookie

    def complete(self, cookie: UdevCookie, ioctl_flags: int) -> bool:
        """Wait until udev has processed the event for ``cookie``; True if it did.

        False if it timed out or the semaphore failed (logged at WARNING).
        The semaphore is destroyed in every case.
        """
        if cookie.semid is None:
            return True
        try:
            if not ioctl_flags & DM_UEVENT_GENERATED_FLAG:
                self._semop(cookie.semid, -1, _IPC_NOWAIT)
            self._semop(cookie.semid, -1, _IPC_NOWAIT)  # the initial 1
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    LOG.warning("udev cookie %#x: udev did not complete within %.1f s "
                                "(is 95-dm-notify.rules installed?)", cookie.value, self.timeout)
                    return False
                ts = _Timespec(int(left), int((left % 1) * 1e9))
                sb = _Sembuf(0, 0, 0)
                if self._libc.semtimedop(cookie.semid, ctypes.byref(sb), 1, ctypes.byref(ts)) == 0:
                    LOG.debug("udev cookie %#x: udev done", cookie.value)
                    return True
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN):
                    raise OSError(err, f"semtimedop: {os.strerror(err)}")
        except OSError as exc:
            LOG.warning("udev cookie %#x: %s", cookie.value, exc)
            return False
        finally:
            self.cancel(cookie)

    def cancel(self, cookie: UdevCookie) -> None:
        """Destroy the cookie's semaphore without waiting (the ioctl failed)."""
        if cookie.semid is not None and self._libc.semctl(cookie.semid, 0, _IPC_RMID) < 0:
            LOG.warning("udev cookie %#x: removing semaphore %d: %s", cookie.value,
                        cookie.semid, os.strerror(ctypes.get_errno()))

    def _semop(self, semid: int, op: int, flg: int) -> None:
        sb = _Sembuf(0, op, flg)
        self._check(self._libc.semop(semid, ctypes.byref(sb), 1), f"semop {op:+d}")

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


class NoUdevSync:
    """Flags-only cookies and no waiting: for hosts without udev, and for tests."""

    def begin(self, udev_flags: int) -> UdevCookie:
        """A cookie with the flags and base 0."""
        return UdevCookie((udev_flags & 0xFFFF) << DM_UDEV_FLAGS_SHIFT)

    def complete(self, cookie: UdevCookie, ioctl_flags: int) -> bool:
        """Nothing to wait for."""
        return True

    def cancel(self, cookie: UdevCookie) -> None:
        """Nothing to destroy."""
