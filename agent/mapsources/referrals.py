"""SBC-3 referrals as a map source: VPD 0x83 / RTPG for a path's group, REPORT REFERRALS for the map.

A path's member is its target port group (TPG): VPD 0x83's target port group
designator on that path, or, when a device reports only the relative target
port, the group REPORT TARGET PORT GROUPS lists that port in. The map is
protocol.referralmap's conversion of the user data segment descriptors,
with VPD 0xB3's segment size and multiplier and READ CAPACITY(16)'s geometry.
Referrals carry no generation: a digest of the raw VPD 0xB3 and REPORT
REFERRALS answers stands in for one, so a poll is those two commands.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, TypeVar

from agent.scsipath import ScsiPath, data_in, read_capacity
from protocol import scsi
from protocol.errors import TruncatedError, ValueRangeError
from protocol.pagemap import PageMap
from protocol.referralmap import referral_region_map, referrals_generation

LOG = logging.getLogger(__name__)
_Page = TypeVar("_Page")

VPD_FIRST_LENGTH = 512
RTPG_LENGTH = 4096
# RETURN DATA LENGTH is 16 bits (SBC-3; LIO writes bytes 2-3): the whole answer fits in this.
REFERRALS_MAX_LENGTH = 4 + 0xFFFF


async def _vpd(path: ScsiPath, page: int, decode: Callable[[bytes], _Page]) -> tuple[_Page, bytes]:
    """A VPD page, asked again with the length it needs when the first answer was cut short."""
    length = VPD_FIRST_LENGTH
    for _ in range(2):
        cdb = scsi.build_inquiry_cdb(evpd=True, page_code=page, allocation_length_bytes=length)
        raw = await data_in(path, cdb, length)
        try:
            return decode(raw), raw
        except TruncatedError as exc:
            if not isinstance(exc.expected, int) or exc.expected <= length or exc.expected > 0xFFFF:
                raise
            length = exc.expected
    raise AssertionError("unreachable")


class ReferralsSource:
    """REPORT REFERRALS (SERVICE ACTION IN(16) 0x13) over target port groups."""

    name = "referrals"

    async def identify(self, path: ScsiPath) -> tuple[int, str]:
        ids, _ = await _vpd(path, scsi.VpdPageCode.DEVICE_IDENTIFICATION, scsi.decode_device_identification_vpd)
        group = ids.target_port_group_id()
        if group is None:
            group = await self._group_of_port(path, ids.relative_target_port_id())
        return group, f"tpg{group}"

    async def _group_of_port(self, path: ScsiPath, port: int | None) -> int:
        if port is None:
            raise ValueRangeError("VPD page 0x83", "target port designators",
                                  "a target port group or relative target port designator", "neither")
        raw = await data_in(path, scsi.build_report_target_port_groups_cdb(RTPG_LENGTH), RTPG_LENGTH)
        for group in scsi.decode_report_target_port_groups(raw).groups:
            if port in group.relative_target_port_ids:
                return group.target_port_group_id
        raise ValueRangeError("REPORT TARGET PORT GROUPS data", f"relative target port {port}",
                              "listed in a target port group", "in none")

    async def _answers(self, path: ScsiPath) -> tuple[scsi.ReferralsVpd, scsi.ReportReferralsData, int]:
        layout, layout_raw = await _vpd(path, scsi.VpdPageCode.REFERRALS, scsi.decode_referrals_vpd)
        length = min(await path.max_transfer_bytes(), REFERRALS_MAX_LENGTH)
        raw = await data_in(path, scsi.build_report_referrals_cdb(0, length), length)
        data = scsi.decode_report_referrals(raw)
        declared = 4 + int.from_bytes(raw[2:4], "big")
        page_length = 4 + int.from_bytes(layout_raw[2:4], "big")
        return layout, data, referrals_generation(bytes(layout_raw[:page_length]), bytes(raw[:declared]))

    async def fetch(self, path: ScsiPath, *, restarts: int) -> PageMap:
        layout, data, generation = await self._answers(path)
        capacity = await read_capacity(path)
        # The array's numbers decide how much work this is: off the event loop (bounded
        # by MAX_REGIONS, but up to ~0.1 s and tens of MiB).
        result = await asyncio.to_thread(
            referral_region_map, data.segments, capacity_blocks=capacity.block_count,
            block_bytes=capacity.block_length_bytes, segment_size_blocks=layout.user_data_segment_size_blocks,
            segment_multiplier=layout.user_data_segment_multiplier, generation=generation)
        LOG.debug("%s: %d referral segments -> %d regions of %d sectors over groups %s", path.name,
                  len(data.segments), result.total_pages, result.page_size_sectors,
                  [m.member_id for m in result.members])
        return result

    async def fetch_changes(self, path: ScsiPath, current: PageMap) -> PageMap | None:
        return None  # REPORT REFERRALS has no changes-since form

    async def poll_generation(self, path: ScsiPath) -> int:
        return (await self._answers(path))[2]
