"""What the device-mapper layer raises (agent.kernel.dm and its ABI and udev modules)::

    SwitchAgentError
     └── DmError                 anything the dm layer raises on purpose
          ├── DmIoctlError       the kernel refused an ioctl: command, device, errno
          ├── NotOwnedError      a mutating call on a device whose uuid lacks our prefix
          ├── DmUnavailableError /dev/mapper/control cannot be opened (no dm in the kernel?)
          └── DmArgumentError    a caller asked for something the ABI cannot carry
                                 (also a ValueError)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from protocol.errors import SwitchAgentError

if TYPE_CHECKING:
    from agent.kernel.dm_abi import DmCommand


class DmError(SwitchAgentError):
    """Root of every error the device-mapper layer raises."""


class DmIoctlError(DmError):
    """The kernel refused a dm ioctl.

    ``command`` is the `DmCommand`, ``name`` the device as the caller named it
    (its uuid when looked up by uuid; None for global commands), ``errno`` the
    kernel's errno. The reason itself is in the kernel log (``DMERR``).
    """

    def __init__(self, command: DmCommand, name: str | None, errno: int, message: str) -> None:
        self.command = command
        self.name = name
        self.errno = errno
        self.message = message
        super().__init__(f"{command} {name or '-'}: {message}")


class NotOwnedError(DmError):
    """A mutating call was refused: the device's uuid does not carry our prefix."""

    def __init__(self, command: DmCommand, name: str, uuid: str, prefix: str) -> None:
        self.command = command
        self.name = name
        self.uuid = uuid
        self.prefix = prefix
        super().__init__(
            f"{command} {name}: refused, uuid {uuid!r} does not start with {prefix!r} "
            "(not a switch-agent device)"
        )


class DmUnavailableError(DmError):
    """The control node cannot be opened: no device-mapper in this kernel, or not root."""

    def __init__(self, path: str, errno: int) -> None:
        self.path = path
        self.errno = errno
        super().__init__(f"{path}: {os.strerror(errno)} (is dm-mod loaded, and are we root?)")


class DmArgumentError(DmError, ValueError):
    """A name, uuid, target or message that the dm ioctl ABI cannot carry."""
