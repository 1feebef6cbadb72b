"""One SCSI path to an array LUN, as every map source and health check uses it.

The path is anything shaped like agent.kernel.sgio.ScsiDevice: the real one
in the daemon, an emulator-backed fake in the host tests. Here: the protocol
it must meet, commands repeated past unit attentions, and the standard
questions (TEST UNIT READY, INQUIRY, READ CAPACITY(16)). What a vendor
protocol asks lives in agent/mapsources/.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Protocol

from protocol import scsi
from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

INQUIRY_LENGTH = 96


class ScsiResultLike(Protocol):
    @property
    def data_in(self) -> bytes:
        """What the device sent."""
        ...


class ScsiPath(Protocol):
    """What the map source needs of a path (agent.kernel.sgio.ScsiDevice's shape)."""

    name: str

    async def max_transfer_bytes(self) -> int:
        """The largest data-in one command may ask for."""
        ...

    def execute(self, cdb: bytes, *, data_in_length: int = 0,
                data_out: bytes | None = None) -> Awaitable[ScsiResultLike]:
        """Run one command; raise a SwitchAgentError on any non-GOOD outcome."""
        ...


class PollablePath(ScsiPath, Protocol):
    """A path that also has a form whose commands block the calling thread (the poll round's)."""

    def blocking(self) -> ScsiPath:
        ...


UNIT_ATTENTION_RETRIES = 8
READ_CAPACITY_16_LENGTH = 32


async def data_in(path: ScsiPath, cdb: bytes, length: int) -> bytes:
    """Run a data-in command, repeating it past unit attentions.

    A unit attention is the array telling this I_T nexus that something
    changed; the command itself was not run. SG_IO hands it to us rather than
    retrying (scsi_error.c), and several may be queued, one per change. The
    udev event it raised is what tells the daemon to look again.
    """
    for _ in range(UNIT_ATTENTION_RETRIES):
        try:
            return (await path.execute(cdb, data_in_length=length)).data_in
        except SwitchAgentError as exc:
            sense = getattr(exc, "sense", None)
            if sense is None or sense.key != scsi.SenseKey.UNIT_ATTENTION:
                raise
            LOG.debug("%s: unit attention (%s); repeating the command", path.name, sense)
    return (await path.execute(cdb, data_in_length=length)).data_in


async def path_answers(path: ScsiPath) -> bool:
    """TEST UNIT READY, past unit attentions: True when the path is back in service."""
    try:
        await data_in(path, scsi.build_test_unit_ready_cdb(), 0)
    except (SwitchAgentError, OSError, ValueError) as exc:
        LOG.debug("%s: TEST UNIT READY failed: %s", path.name, exc)
        return False
    return True


async def read_inquiry(path: ScsiPath) -> scsi.StandardInquiry:
    """Standard INQUIRY: vendor and product tell whether the LUN is an array we serve."""
    data = await data_in(path, scsi.build_inquiry_cdb(allocation_length_bytes=INQUIRY_LENGTH), INQUIRY_LENGTH)
    return scsi.decode_standard_inquiry(data)


async def read_capacity(path: ScsiPath) -> scsi.ReadCapacity16Data:
    """READ CAPACITY(16): the LUN's blocks and logical block length, as the array says now."""
    cdb = scsi.build_read_capacity_16_cdb(READ_CAPACITY_16_LENGTH)
    return scsi.decode_read_capacity_16(await data_in(path, cdb, READ_CAPACITY_16_LENGTH))
