"""Map sources: where a LUN's region map comes from, one plug-in per protocol.

    page-map   the open vendor protocol (docs/protocol.md): VPD 0xC0 names a
               path's member, GET PAGE MAP gives a dense page map
    referrals  SBC-3 REPORT REFERRALS (docs/referrals.md): VPD 0x83 names a
               path's target port group, the user data segment descriptors
               give each LBA range's optimized group

Each configured array says which to use (`map_source` in the config), or
"auto": VPD page 0x00 is asked, and 0xC0 picks page-map, else 0xB3 picks
referrals (when the device also lists the Extended INQUIRY page, its R_SUP
bit must be set: LIO lists 0xB3 on every LUN, with or without an lba_map). The orchestrator only sees
the MapSource protocol (base.py); this module is the registry.
"""

from __future__ import annotations

from agent.mapsources.base import MapSource
from agent.mapsources.pagemap import PageMapSource
from agent.mapsources.referrals import ReferralsSource
from agent.scsipath import ScsiPath, data_in
from protocol import scsi
from protocol.pagemap import MEMBER_IDENTITY_VPD
from protocol.errors import SwitchAgentError

__all__ = ["MapSource", "NoMapSourceError", "SOURCES", "SETTINGS", "choose", "get"]


class NoMapSourceError(SwitchAgentError):
    """`auto` found neither the vendor page map nor referrals on the LUN."""


SOURCES: dict[str, MapSource] = {source.name: source for source in (PageMapSource(), ReferralsSource())}
SETTINGS = ("page-map", "referrals", "auto")
"""What a configured array's `map_source` may say."""

VPD_LIST_LENGTH = 255
EXTENDED_INQUIRY_LENGTH = 64
_R_SUP = 0x10  # Extended INQUIRY Data VPD byte 8 bit 4 (SPC-4 7.8.7): referrals supported


async def _referrals_supported(path: ScsiPath) -> bool:
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=scsi.VpdPageCode.EXTENDED_INQUIRY_DATA,
                                 allocation_length_bytes=EXTENDED_INQUIRY_LENGTH)
    raw = await data_in(path, cdb, EXTENDED_INQUIRY_LENGTH)
    payload = scsi.decode_vpd_page(raw, scsi.VpdPageCode.EXTENDED_INQUIRY_DATA).payload
    return len(payload) > 4 and bool(payload[4] & _R_SUP)


def get(name: str) -> MapSource:
    """The plug-in by name (a Topology records the name it was discovered with)."""
    return SOURCES[name]


async def choose(setting: str, path: ScsiPath) -> MapSource:
    """The configured plug-in, or for "auto" the one the LUN's supported VPD pages point to."""
    if setting != "auto":
        return SOURCES[setting]
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=scsi.VpdPageCode.SUPPORTED_VPD_PAGES,
                                 allocation_length_bytes=VPD_LIST_LENGTH)
    pages = scsi.decode_supported_vpd_pages(await data_in(path, cdb, VPD_LIST_LENGTH)).page_codes
    if MEMBER_IDENTITY_VPD in pages:
        return SOURCES["page-map"]
    if scsi.VpdPageCode.REFERRALS in pages:
        # LIO lists 0xB3 on every LUN (target_core_spc.c evpd_handlers) but sets R_SUP in the
        # Extended INQUIRY page only while an lba_map exists (spc_emulate_evpd_86).
        if scsi.VpdPageCode.EXTENDED_INQUIRY_DATA in pages and not await _referrals_supported(path):
            raise NoMapSourceError(f"{path.name}: map_source = \"auto\": VPD 0xb3 is listed but the "
                                   "Extended INQUIRY page's R_SUP bit is 0 (no referrals right now)")
        return SOURCES["referrals"]
    raise NoMapSourceError(f"{path.name}: map_source = \"auto\", but the LUN lists neither VPD page "
                           f"0xc0 (page map) nor 0xb3 (referrals) among {sorted(pages)}")
