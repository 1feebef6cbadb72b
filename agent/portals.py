"""Where each member of a volume can be logged in to: the session manager's input.

Two sources (docs/protocol.md section 7, docs/referrals.md "Member portals"):

- page-map arrays (protocol 1.1) answer VPD page 0xC1 on any path:
  ``read_member_portals``; an array that does not list the page in VPD 0x00
  gives None, and the host keeps the sessions it has (unmanaged);
- referrals arrays say nothing of portals: SendTargets discovery records
  are matched to RTPG's target port groups by ``match_sendtargets``
  (pure; the caller runs iscsiadm and RTPG).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from agent import scsipath
from agent.scsipath import ScsiPath
from protocol import portals, scsi
from protocol.errors import DecodeError, TruncatedError, ValueRangeError
from protocol.portals import MemberPortals, MemberPortalsPage, Portal

LOG = logging.getLogger(__name__)

SUPPORTED_PAGES_LENGTH = 255
FIRST_READ_LENGTH = 1024
"""Holds a 3-member page many times over; a longer page is read again at its own length."""
MAX_VPD_LENGTH = 0xFFFF

NOT_OFFERED = ("the array does not list VPD page 0xC1 (member portals) in VPD 0x00: "
               "its sessions are unmanaged")
"""What status says for a volume whose array is a protocol-1.0 one."""


async def read_member_portals_page(path: ScsiPath) -> MemberPortalsPage | None:
    """VPD 0xC1 over `path` with its generation, or None when the array does not offer it.

    Decode errors (protocol.errors.DecodeError) and path errors go to the caller.
    """
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=0, allocation_length_bytes=SUPPORTED_PAGES_LENGTH)
    supported = scsi.decode_supported_vpd_pages(
        await scsipath.data_in(path, cdb, SUPPORTED_PAGES_LENGTH))
    if portals.MEMBER_PORTALS_VPD not in supported.page_codes:
        LOG.debug("%s: %s", path.name, NOT_OFFERED)
        return None
    data = await _read_page(path, FIRST_READ_LENGTH)
    try:
        return portals.decode_member_portals_vpd(data)
    except TruncatedError as exc:
        # Longer than the first read: ask once more at the length the page says.
        wanted = exc.expected
        if not isinstance(wanted, int) or not FIRST_READ_LENGTH < wanted <= MAX_VPD_LENGTH:
            raise
    return portals.decode_member_portals_vpd(await _read_page(path, wanted))


async def _read_page(path: ScsiPath, length: int) -> bytes:
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=portals.MEMBER_PORTALS_VPD,
                                 allocation_length_bytes=length)
    return await scsipath.data_in(path, cdb, length)


async def read_member_portals(path: ScsiPath) -> tuple[MemberPortals, ...] | None:
    """Every member of the volume with its portals, or None when the array does not say (1.0)."""
    page = await read_member_portals_page(path)
    return None if page is None else page.members


# -- referrals arrays: SendTargets matched to target port groups ---------------------


@dataclass(frozen=True)
class SendTargetsRecord:
    """One line of ``iscsiadm -m discovery -t st``: ``ADDR:PORT,TPGT TARGET`` (IPv6 without brackets here)."""

    address: str
    port: int
    tpgt: int
    target: str


@dataclass(frozen=True)
class PortalMatch:
    """SendTargets matched to target port groups: one member per group, and what could not be placed."""

    members: tuple[MemberPortals, ...]
    unmatched: tuple[SendTargetsRecord, ...]
    """Portals of the target whose group is unknown: a login there tells (VPD 0x83)."""
    reasons: tuple[str, ...]
    """One line per portal not placed, and per group with no portal, for status."""


_SENDTARGETS_LINE = re.compile(r"^(?P<address>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d{1,5}),"
                               r"(?P<tpgt>\d{1,5}) (?P<target>\S+)$")


def parse_sendtargets(text: str) -> tuple[SendTargetsRecord, ...]:
    """``iscsiadm -m discovery -t st`` output, one record per line (docs/referrals.md shows it).

    A line of another shape is a ValueRangeError naming it: iscsiadm's
    format changed, and guessing would log in somewhere else.
    """
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SENDTARGETS_LINE.match(line.strip())
        if match is None or not 0 < int(match["port"]) < 1 << 16 or int(match["tpgt"]) >= 1 << 16:
            raise ValueRangeError("iscsiadm SendTargets output", f"line {number}",
                                  "ADDR:PORT,TPGT TARGET", line)
        records.append(SendTargetsRecord(match["address"].strip("[]"), int(match["port"]),
                                         int(match["tpgt"]), match["target"]))
    return tuple(records)


_TAG_SUFFIX = re.compile(r",t,0x([0-9a-fA-F]{1,4})$")


def observed_port(ids: scsi.DeviceIdentificationVpd) -> tuple[int, int] | None:
    """(portal group tag, relative target port) of the path that answered this VPD 0x83, if it says both.

    iSCSI names a target port ``<target name>,t,0x<tag>`` (the SCSI name
    string designator, association target port, that LIO sends): so a
    path tells its tag without sysfs.
    """
    rtp = ids.relative_target_port_id()
    for designator in ids.find(scsi.DesignatorType.SCSI_NAME_STRING, scsi.Association.TARGET_PORT):
        try:
            match = _TAG_SUFFIX.search(designator.scsi_name)
        except DecodeError:
            continue
        if match and rtp:
            return int(match.group(1), 16), rtp
    return None


def match_sendtargets(records: Iterable[SendTargetsRecord], target: str,
                      groups: Mapping[int, Sequence[int]],
                      observed: Mapping[int, int]) -> PortalMatch:
    """Which portals reach which target port group (= member) of a referrals array.

    `records` are SendTargets answers (other targets' are ignored); `groups`
    is RTPG's target port group id -> relative target port ids; `observed`
    is portal group tag -> relative target port, as read from VPD 0x83 on a
    path logged in through that tag (``observed_port``, or sysfs ``tpgt``). An iSCSI portal group
    is one SCSI target port, so a tag has one relative target port:

    1. a tag observed on a path: that path's relative target port (certain);
    2. else, when every observed tag has relative target port == tag (LIO
       numbers them so when the TPGs export the LUN in tag order) and some
       were observed: relative target port = tag, if RTPG lists it;
    3. else the portal is unmatched: the caller may log in once to learn it.

    A member's id is its target port group id, as the referrals map source names members.
    """
    port_to_group = {port: group for group, ports in groups.items() for port in ports}
    by_tag_rule = bool(observed) and all(tag == rtp for tag, rtp in observed.items())
    placed: dict[int, list[Portal]] = {group: [] for group in groups}
    unmatched: list[SendTargetsRecord] = []
    reasons: list[str] = []
    for record in records:
        if record.target != target:
            continue
        where = f"{record.address}:{record.port},{record.tpgt}"
        try:
            address = ipaddress.ip_address(record.address)
        except ValueError:
            reasons.append(f"{where}: not an IP address")
            continue
        if record.tpgt in observed:
            rtp = observed[record.tpgt]
        elif by_tag_rule:
            rtp = record.tpgt
        else:
            unmatched.append(record)
            reasons.append(f"{where}: no path through portal group {record.tpgt} yet, and the array's "
                           "relative target ports are not its portal group tags")
            continue
        group = port_to_group.get(rtp)
        if group is None:
            unmatched.append(record)
            reasons.append(f"{where}: relative target port {rtp} is in no target port group RTPG lists")
            continue
        placed[group].append(Portal(address, record.port, record.tpgt, rtp))
    for group in sorted(g for g, found in placed.items() if not found):
        reasons.append(f"target port group {group}: no portal found for it")
    members = tuple(MemberPortals(group, group, tuple(found))
                    for group, found in sorted(placed.items()) if found)
    return PortalMatch(members, tuple(unmatched), tuple(reasons))
