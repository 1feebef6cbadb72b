"""Reading an array LUN over one SCSI path: identity, member, and the page map.

The path is anything shaped like agent.kernel.sgio.ScsiDevice: the real one
in the daemon, an emulator-backed fake in the host tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from protocol import pagemap, scsi
from protocol.errors import CapacityMismatchError, GenerationChangedError, SwitchAgentError
from protocol.pagemap import MemberIdentity, PageMap, PageMapHeader

LOG = logging.getLogger(__name__)

INQUIRY_LENGTH = 96
VPD_LENGTH = 255


class ScsiResultLike(Protocol):
    data_in: bytes


class ScsiPath(Protocol):
    """What the map source needs of a path (agent.kernel.sgio.ScsiDevice's shape)."""

    name: str

    async def max_transfer_bytes(self) -> int:
        """The largest data-in one command may ask for."""
        ...

    async def execute(self, cdb: bytes, *, data_in_length: int = 0,
                      data_out: bytes | None = None) -> ScsiResultLike:
        """Run one command; raise a SwitchAgentError on any non-GOOD outcome."""
        ...


UNIT_ATTENTION_RETRIES = 8
READ_CAPACITY_16_LENGTH = 32
OFF_LOOP_DECODE_BYTES = 256 * 1024
"""A GET PAGE MAP answer larger than this is decoded in a worker thread: a 16 MiB chunk holds
64M entries, and decoding it on the event loop would stall every other LUN."""


async def _data_in(path: ScsiPath, cdb: bytes, length: int) -> bytes:
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


data_in = _data_in
"""The same, for the map-source plug-ins (agent/mapsources/)."""


async def path_answers(path: ScsiPath) -> bool:
    """TEST UNIT READY, past unit attentions: True when the path is back in service."""
    try:
        await _data_in(path, scsi.build_test_unit_ready_cdb(), 0)
    except (SwitchAgentError, OSError, ValueError) as exc:
        LOG.debug("%s: TEST UNIT READY failed: %s", path.name, exc)
        return False
    return True


async def read_inquiry(path: ScsiPath) -> scsi.StandardInquiry:
    """Standard INQUIRY: vendor and product tell whether the LUN is an array we serve."""
    data = await _data_in(path, scsi.build_inquiry_cdb(allocation_length_bytes=INQUIRY_LENGTH), INQUIRY_LENGTH)
    return scsi.decode_standard_inquiry(data)


async def read_member_identity(path: ScsiPath) -> MemberIdentity:
    """VPD page 0xC0: which member this path lands on."""
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=pagemap.MEMBER_IDENTITY_VPD,
                                 allocation_length_bytes=VPD_LENGTH)
    data = await _data_in(path, cdb, VPD_LENGTH)
    return pagemap.decode_member_identity_vpd(data)


async def read_capacity(path: ScsiPath) -> scsi.ReadCapacity16Data:
    """READ CAPACITY(16): the LUN's blocks and logical block length, as the array says now."""
    cdb = scsi.build_read_capacity_16_cdb(READ_CAPACITY_16_LENGTH)
    return scsi.decode_read_capacity_16(await _data_in(path, cdb, READ_CAPACITY_16_LENGTH))


async def poll_map_header(path: ScsiPath) -> PageMapHeader:
    """The 64-byte GET PAGE MAP: generation and geometry, cheaply."""
    size = pagemap.HEADER_FIXED_BYTES
    data = await _data_in(path, pagemap.build_get_page_map_cdb(0, size), size)
    return pagemap.decode_page_map_header(data)


async def fetch_page_map(path: ScsiPath, *, restarts: int) -> PageMap:
    """The whole map in chunks of the path's maximum transfer, all of one generation.

    READ CAPACITY(16) over the same path comes first: the first chunk's
    geometry must cover exactly that capacity, in pages of whole logical
    blocks, before anything is allocated (protocol.pagemap.PageMapAssembler).
    Starts over when the array changes the map mid-fetch (or its capacity
    between the two), at most `restarts` times; then the last error goes to
    the caller.
    """
    allocation = min(await path.max_transfer_bytes(), pagemap.MAX_ALLOCATION_LENGTH)
    for attempt in range(restarts + 1):
        try:
            capacity = await read_capacity(path)
            assembler = pagemap.PageMapAssembler(capacity_bytes=capacity.capacity_bytes,
                                                 logical_block_bytes=capacity.block_length_bytes,
                                                 allocation_length=allocation)
            while not assembler.complete:
                cdb = pagemap.build_get_page_map_cdb(assembler.next_page, allocation)
                data = await _data_in(path, cdb, allocation)
                if len(data) > OFF_LOOP_DECODE_BYTES:
                    chunk = await asyncio.to_thread(pagemap.decode_page_map_response, data)
                else:
                    chunk = pagemap.decode_page_map_response(data)
                assembler.add(chunk)
        except (GenerationChangedError, CapacityMismatchError) as exc:
            if attempt == restarts:
                raise
            LOG.info("%s: page map changed during the fetch (%s); starting over", path.name, exc)
            continue
        result = assembler.result()
        LOG.debug("%s: fetched page map generation %d, %d pages", path.name, result.generation,
                  result.total_pages)
        return result
    raise AssertionError("unreachable")
