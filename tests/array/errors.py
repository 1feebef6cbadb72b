"""Errors of the emulated array (tests/array), rooted in the project's error tree.

    SwitchAgentError
     └── EmulatorError            anything the emulated array fails at
          ├── RingError           the TCMU ring holds something the ABI does not allow
          ├── UioDeviceError      a TCMU uio device is missing, busy or mis-sized
          ├── StoreError          the sparse backing store cannot hold or reach a range
          ├── LayoutError         a page layout cannot be built as asked
          ├── ArrayStateError     a control request the array cannot carry out
          ├── LioError            configfs / rtslib set-up or teardown failed
          ├── InitiatorError      iscsiadm / multipath / sysfs on the initiator side failed
          └── ControlError        the control socket: no server, bad request, server error
"""

from __future__ import annotations

from protocol.errors import SwitchAgentError


class EmulatorError(SwitchAgentError):
    """Root of the emulated array's own errors."""


class RingError(EmulatorError):
    """The TCMU command ring holds an entry or offset the ABI does not allow."""


class UioDeviceError(EmulatorError):
    """A TCMU uio device is missing, already open elsewhere, or mapped at the wrong size."""


class StoreError(EmulatorError):
    """The sparse backing store was asked for a range it cannot hold."""


class LayoutError(EmulatorError):
    """A page-owner layout cannot be built with the given parameters."""


class ArrayStateError(EmulatorError):
    """A control request (move, resize, remove-member...) the array cannot carry out."""


class LioError(EmulatorError):
    """Setting up or tearing down the LIO target (configfs via rtslib-fb) failed."""


class InitiatorError(EmulatorError):
    """An initiator-side step (iscsiadm, multipath, sysfs lookup) failed or timed out."""


class ControlError(EmulatorError):
    """The control socket: no server listening, a malformed request, or the server's own error."""
