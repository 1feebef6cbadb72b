"""The open vendor protocol (docs/protocol.md) as a map source: VPD 0xC0 and GET PAGE MAP."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, TypeVar

from agent.scsipath import ScsiPath, data_in, read_capacity
from protocol import pagemap, pagemap_changes, scsi
from protocol.errors import CapacityMismatchError, ChangesUnavailableError, GenerationChangedError, SwitchAgentError
from protocol.pagemap import MemberIdentity, PageMap, PageMapHeader

T = TypeVar("T")
LOG = logging.getLogger(__name__)

VPD_LENGTH = 255
OFF_LOOP_DECODE_BYTES = 256 * 1024
"""A GET PAGE MAP answer larger than this is decoded in a worker thread: a 16 MiB chunk holds
64M entries, and decoding it on the event loop would stall every other LUN."""


class PageMapSource:
    """Member from VPD 0xC0, map from GET PAGE MAP, generation from its 64-byte header."""

    name = "page-map"

    def __init__(self) -> None:
        self._features: dict[str, int] = {}
        """Each path's VPD 0xC0 FEATURES as its last identify read them (every reconcile does, first)."""

    async def identify(self, path: ScsiPath) -> tuple[int, str]:
        identity = await read_member_identity(path)
        self._features[path.name] = identity.features
        return identity.member_id, identity.name

    async def fetch(self, path: ScsiPath, *, restarts: int) -> PageMap:
        return await fetch_page_map(path, restarts=restarts)

    async def fetch_changes(self, path: ScsiPath, current: PageMap) -> PageMap | None:
        if not self._features.get(path.name, 0) & pagemap_changes.FEATURE_CHANGES_SINCE:
            return None  # a 1.0/1.1 array: asked the whole way, as always
        try:
            return await fetch_page_map_changes(path, current)
        except ChangesUnavailableError as exc:
            LOG.info("%s: %s; fetching the whole map", path.name, exc)
        except SwitchAgentError as exc:
            # Whatever went wrong with the short form, the whole map is the answer that decides.
            LOG.warning("%s: changes since generation %d unusable (%s: %s); fetching the whole map",
                        path.name, current.generation, type(exc).__name__, exc)
        return None

    async def poll_generation(self, path: ScsiPath) -> int:
        return (await poll_map_header(path)).generation


async def read_member_identity(path: ScsiPath) -> MemberIdentity:
    """VPD page 0xC0: which member this path lands on."""
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=pagemap.MEMBER_IDENTITY_VPD,
                                 allocation_length_bytes=VPD_LENGTH)
    data = await data_in(path, cdb, VPD_LENGTH)
    return pagemap.decode_member_identity_vpd(data)


async def poll_map_header(path: ScsiPath) -> PageMapHeader:
    """The 64-byte GET PAGE MAP: generation and geometry, cheaply."""
    size = pagemap.HEADER_FIXED_BYTES
    data = await data_in(path, pagemap.build_get_page_map_cdb(0, size), size)
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
                data = await data_in(path, cdb, allocation)
                assembler.add(await _decode(pagemap.decode_page_map_response, data))
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


async def _decode(decoder: Callable[[bytes], T], data: bytes) -> T:
    """`decoder(data)`, in a worker thread when the answer is large enough to stall the event loop."""
    if len(data) > OFF_LOOP_DECODE_BYTES:
        return await asyncio.to_thread(decoder, data)
    return decoder(data)


async def fetch_page_map_changes(path: ScsiPath, current: PageMap) -> PageMap:
    """`current` brought up to the array's generation by GET PAGE MAP's changes-since form.

    The result's `changed_pages` are the pages whose owner differs from
    `current`'s; `current` itself is left as it is. Raises
    ChangesUnavailableError when the array says to fetch the whole map, and
    a DecodeError for an answer that does not fit `current`.
    """
    allocation = min(await path.max_transfer_bytes(), pagemap.MAX_ALLOCATION_LENGTH)
    assembler = pagemap_changes.ChangesAssembler(current)
    while not assembler.complete:
        cdb = pagemap_changes.build_changes_since_cdb(assembler.since, allocation)
        data = await data_in(path, cdb, allocation)
        assembler.add(await _decode(pagemap_changes.decode_changes_response, data))
    result = assembler.result()
    LOG.debug("%s: page map generation %d -> %d: %d pages changed", path.name, current.generation,
              result.generation, 0 if result.changed_pages is None else result.changed_pages.size)
    return result
