"""VPD 0xC1 member portals: round trips, the exact layout, and every way a page can be bad."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import portals as agent_portals
from protocol import portals as pp
from protocol import scsi
from protocol.errors import (
    BadMagicError,
    ChecksumError,
    DecodeError,
    EncodeError,
    TruncatedError,
    ValueRangeError,
)
from tests.unit.fakes_kernel import FakeArrayPath, FakeSystem, MiB

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def portal(addr: str, rtp: int, *, port: int = 3260, tag: int | None = None) -> pp.Portal:
    return pp.Portal(ipaddress.ip_address(addr), port, rtp if tag is None else tag, rtp)


THREE = pp.MemberPortalsPage(7, (
    pp.MemberPortals(1, 1, (portal("127.0.0.1", 1),)),
    pp.MemberPortals(2, 2, (portal("127.0.0.2", 2), portal("fd00::2", 12, port=3261, tag=9))),
    pp.MemberPortals(3, 3, (portal("127.0.0.3", 3),)),
))


def resign(buf: bytearray) -> bytes:
    """Recompute the trailer CRC so a test reaches the check behind it."""
    buf[-4:] = struct.pack(">I", crc32c(bytes(buf[:-4])))
    return bytes(buf)


def test_round_trip_keeps_every_field_and_address_family():
    page = pp.decode_member_portals_vpd(pp.encode_member_portals_vpd(THREE))
    assert page == THREE
    assert isinstance(page.members[0].portals[0].address, V4)
    assert isinstance(page.members[1].portals[1].address, V6)
    assert page.members[1].portals[1].iscsiadm_portal == "[fd00::2]:3261"
    assert page.members[0].portals[0].iscsiadm_portal == "127.0.0.1:3260"


def test_layout_is_the_documented_one():
    one = pp.MemberPortalsPage(0x0102030405060708, (
        pp.MemberPortals(0xA1B2C3D4, 0x0505, (portal("10.1.2.3", 0x0707, port=0x0CBC, tag=0x0606),)),))
    data = pp.encode_member_portals_vpd(one)
    assert len(data) == pp.page_length([1]) == 20 + 8 + 24 + 4
    assert data[:4] == bytes([0, 0xC1, 0, len(data) - 4])
    assert data[4:8] == b"SAMP" and data[8] == 1 and data[9] == 1 and data[10:12] == b"\0\0"
    assert data[12:20] == bytes(range(1, 9))
    assert data[20:28] == bytes.fromhex("a1b2c3d4 0505 01 00")
    assert data[28:44] == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])  # IPv4-mapped
    assert data[44:52] == bytes.fromhex("0cbc 0606 0707 0000")
    assert data[52:56] == struct.pack(">I", crc32c(data[:52]))


member_ids = st.integers(0, (1 << 32) - 1)
usable = st.ip_addresses().filter(
    lambda a: not (a.is_unspecified or a.is_multicast or (a.version == 6 and a.ipv4_mapped)))


@st.composite
def pages(draw) -> pp.MemberPortalsPage:
    count = draw(st.integers(1, 12))
    ids = draw(st.lists(member_ids, min_size=count, max_size=count, unique=True))
    sizes = draw(st.lists(st.integers(1, pp.MAX_PORTALS_PER_MEMBER), min_size=count, max_size=count))
    rtps = iter(draw(st.lists(st.integers(1, 0xFFFF), min_size=sum(sizes), max_size=sum(sizes),
                              unique=True)))
    members = tuple(
        pp.MemberPortals(member_id, draw(st.integers(0, 0xFFFF)), tuple(
            pp.Portal(draw(usable), draw(st.integers(1, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
                      next(rtps)) for _ in range(size)))
        for member_id, size in zip(ids, sizes))
    return pp.MemberPortalsPage(draw(st.integers(0, (1 << 64) - 1)), members)


@settings(max_examples=100, deadline=None)
@given(pages())
def test_property_any_page_round_trips(page):
    data = pp.encode_member_portals_vpd(page)
    assert len(data) == pp.page_length([len(m.portals) for m in page.members])
    assert pp.decode_member_portals_vpd(data + b"\xee" * 3) == page  # bytes past the page ignored


@settings(max_examples=100, deadline=None)
@given(pages(), st.data())
def test_property_every_truncation_says_how_much_to_ask_for(page, data):
    full = pp.encode_member_portals_vpd(page)
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(TruncatedError) as info:
        pp.decode_member_portals_vpd(full[:cut])
    # Asking again with `expected` bytes gets either the page or, from a short header, more of it.
    expected = info.value.expected
    assert isinstance(expected, int) and cut < expected <= len(full)
    if cut >= 4:
        assert expected == len(full)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoder_raises_only_decode_errors(blob):
    try:
        pp.decode_member_portals_vpd(blob)
    except DecodeError:
        pass


@settings(max_examples=150, deadline=None)
@given(pages(), st.data())
def test_fuzz_mutated_resigned_pages_decode_or_raise_typed(page, data):
    buf = bytearray(pp.encode_member_portals_vpd(page))
    at = data.draw(st.integers(0, len(buf) - 5))
    buf[at] ^= data.draw(st.integers(1, 255))
    try:
        decoded = pp.decode_member_portals_vpd(resign(buf))
    except DecodeError:
        return
    # Whatever got through is still a page the encoder could have written.
    assert pp.decode_member_portals_vpd(pp.encode_member_portals_vpd(decoded)) == decoded


def test_crc_mismatch():
    buf = bytearray(pp.encode_member_portals_vpd(THREE))
    buf[30] ^= 1
    with pytest.raises(ChecksumError):
        pp.decode_member_portals_vpd(bytes(buf))


@pytest.mark.parametrize("offset,value,error,field", [
    (1, 0xC0, BadMagicError, "page code"),
    (4, ord("X"), BadMagicError, "magic"),
    (8, 2, BadMagicError, "format version"),
    (9, 0, ValueRangeError, "member count"),
    (9, 4, ValueRangeError, "member 3 record"),
    (9, 2, ValueRangeError, "page length"),
    (10, 1, ValueRangeError, "reserved"),
    (26, 0, ValueRangeError, "member 0 portal count"),
    (26, pp.MAX_PORTALS_PER_MEMBER + 1, ValueRangeError, "member 0 portal count"),
    (26, 3, ValueRangeError, "member 0 portal"),
    (27, 1, ValueRangeError, "member 0 reserved"),
])
def test_header_and_record_checks_name_the_field(offset, value, error, field):
    buf = bytearray(pp.encode_member_portals_vpd(THREE))
    buf[offset] = value
    with pytest.raises(error) as info:
        pp.decode_member_portals_vpd(resign(buf))
    assert info.value.field.startswith(field)


def test_portal_checks():
    base = pp.encode_member_portals_vpd(THREE)
    first = 28  # member 0's first portal record
    for at, raw, field in (
        (first, bytes(16), "address"),                               # ::
        (first, bytes(10) + b"\xff\xff" + bytes(4), "address"),       # 0.0.0.0
        (first, bytes.fromhex("ff02") + bytes(14), "address"),        # multicast
        (first + 16, b"\0\0", "TCP port"),
        (first + 20, b"\0\0", "relative target port"),
        (first + 22, b"\0\1", "reserved"),
    ):
        buf = bytearray(base)
        buf[at:at + len(raw)] = raw
        with pytest.raises(ValueRangeError) as info:
            pp.decode_member_portals_vpd(resign(buf))
        assert field in info.value.field


def test_duplicates_are_refused_both_ways():
    same_id = pp.MemberPortalsPage(1, (pp.MemberPortals(5, 1, (portal("10.0.0.1", 1),)),
                                       pp.MemberPortals(5, 2, (portal("10.0.0.2", 2),))))
    same_rtp = pp.MemberPortalsPage(1, (pp.MemberPortals(5, 1, (portal("10.0.0.1", 1),)),
                                        pp.MemberPortals(6, 2, (portal("10.0.0.2", 1),))))
    for page in (same_id, same_rtp):
        with pytest.raises(EncodeError):
            pp.encode_member_portals_vpd(page)
    # The same bytes from an array that does not check: the host refuses them.
    good = pp.encode_member_portals_vpd(pp.MemberPortalsPage(1, (
        pp.MemberPortals(5, 1, (portal("10.0.0.1", 1),)),
        pp.MemberPortals(6, 2, (portal("10.0.0.2", 2),)))))
    second_member, second_rtp = 20 + 8 + 24, 20 + 8 + 24 + 8 + 20
    for at, raw, field in ((second_member, struct.pack(">I", 5), "member ids"),
                           (second_rtp, struct.pack(">H", 1), "relative target ports")):
        buf = bytearray(good)
        buf[at:at + len(raw)] = raw
        with pytest.raises(ValueRangeError) as info:
            pp.decode_member_portals_vpd(resign(buf))
        assert info.value.field == field


@pytest.mark.parametrize("page", [
    pp.MemberPortalsPage(1, ()),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, ()),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, (portal("10.0.0.1", 1),) * 2),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, tuple(
        portal(f"10.0.0.{i}", i) for i in range(1, pp.MAX_PORTALS_PER_MEMBER + 2))),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, (portal("0.0.0.0", 1),)),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, (portal("10.0.0.1", 1, port=0),)),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1 << 16, (portal("10.0.0.1", 1),)),)),
    pp.MemberPortalsPage(-1, (pp.MemberPortals(1, 1, (portal("10.0.0.1", 1),)),)),
    pp.MemberPortalsPage(1, (pp.MemberPortals(1, 1, (pp.Portal("10.0.0.1", 3260, 1, 1),)),)),
])
def test_encoder_refuses_what_the_page_cannot_say(page):
    with pytest.raises(EncodeError):
        pp.encode_member_portals_vpd(page)


def test_largest_page_fits_a_vpd_page():
    rtp = iter(range(1, 1 << 16))
    members = tuple(pp.MemberPortals(i, i, tuple(
        pp.Portal(V6(f"fd00::{i:x}:{j}"), 3260, i, next(rtp)) for j in range(pp.MAX_PORTALS_PER_MEMBER)))
        for i in range(pp.MAX_MEMBERS))
    data = pp.encode_member_portals_vpd(pp.MemberPortalsPage(1, members))
    assert len(data) <= pp.MAX_PAGE_BYTES
    assert len(pp.decode_member_portals_vpd(data).members) == pp.MAX_MEMBERS


# -- host side: reading the page over a path (agent/portals.py) ----------------------------

def run(coro):
    return asyncio.run(coro)


def test_reader_gets_every_member_through_one_path_after_add_member(tmp_path):
    system = FakeSystem(tmp_path=tmp_path, members=3, paths_per_member=1)
    system.volume.add_member()
    path = system.open_path("sdb")
    found = run(agent_portals.read_member_portals(path))
    assert [(m.member_id, m.portals[0].iscsiadm_portal, m.portals[0].portal_group_tag) for m in found] == [
        (1, "127.0.0.1:3260", 1), (2, "127.0.0.2:3260", 2), (3, "127.0.0.3:3260", 3),
        (4, "127.0.0.4:3260", 4)]
    page = run(agent_portals.read_member_portals_page(path))
    assert page.generation == system.volume.generation


def test_reader_says_none_for_an_array_without_the_page(tmp_path):
    system = FakeSystem(tmp_path=tmp_path, members=2, paths_per_member=1)
    system.lu.member_portals = False
    path = system.open_path("sdb")
    assert run(agent_portals.read_member_portals(path)) is None
    assert path.commands == 1  # VPD 0x00 only: the page is never asked for


def test_reader_reads_a_long_page_again_at_its_own_length(tmp_path):
    system = FakeSystem(tmp_path=tmp_path, size_bytes=64 * MiB, page_size_bytes=MiB, members=60,
                        paths_per_member=1)
    path = system.open_path("sdb")
    assert pp.page_length([1] * 60) > agent_portals.FIRST_READ_LENGTH
    found = run(agent_portals.read_member_portals(path))
    assert len(found) == 60 and found[-1].portals[0].iscsiadm_portal == "127.0.0.60:3260"
    assert path.commands == 3


class DamagingPath(FakeArrayPath):
    """A path whose VPD 0xC1 answers arrive with one byte flipped (a bad array or link)."""

    async def execute(self, cdb, *, data_in_length=0, data_out=None):
        result = await super().execute(cdb, data_in_length=data_in_length, data_out=data_out)
        if cdb[0] == scsi.Opcode.INQUIRY and cdb[1] & 1 and cdb[2] == pp.MEMBER_PORTALS_VPD:
            data = bytearray(result.data_in)
            data[24] ^= 0x40
            result.data_in = bytes(data)
        return result


def test_reader_raises_the_codecs_typed_error_on_a_damaged_page(tmp_path):
    system = FakeSystem(tmp_path=tmp_path, members=2, paths_per_member=1)
    with pytest.raises(ChecksumError):
        run(agent_portals.read_member_portals(DamagingPath(system.lu, 0, "sdz")))


# -- referrals arrays: SendTargets matched to RTPG's groups -------------------------------

IQN = "iqn.2026-11.org.switch-agent:lio-referrals"


def st_record(tag: int, address: str | None = None, target: str = IQN) -> agent_portals.SendTargetsRecord:
    return agent_portals.SendTargetsRecord(address or f"127.0.0.{tag}", 3260, tag, target)


def placed(match: agent_portals.PortalMatch) -> dict[int, list[tuple[str, int, int]]]:
    return {m.member_id: [(p.iscsiadm_portal, p.portal_group_tag, p.relative_target_port) for p in m.portals]
            for m in match.members}


def test_match_uses_what_paths_observed_and_tags_when_they_agree():
    records = [st_record(1), st_record(2), st_record(3), st_record(3, "fd00::3"),
               st_record(1, "10.9.9.9", target="iqn.other:target")]
    match = agent_portals.match_sendtargets(records, IQN, {1: [1], 2: [2], 3: [3]}, observed={1: 1})
    assert placed(match) == {1: [("127.0.0.1:3260", 1, 1)], 2: [("127.0.0.2:3260", 2, 2)],
                             3: [("127.0.0.3:3260", 3, 3), ("[fd00::3]:3260", 3, 3)]}
    assert match.unmatched == () and match.reasons == ()


def test_match_does_not_guess_when_ports_are_not_the_tags():
    # LIO numbered the ports in another order: tag 1 is relative port 5.
    records = [st_record(1), st_record(2), st_record(3)]
    match = agent_portals.match_sendtargets(records, IQN, {10: [5], 20: [6], 30: [7]}, observed={1: 5})
    assert placed(match) == {10: [("127.0.0.1:3260", 1, 5)]}
    assert match.unmatched == (st_record(2), st_record(3))
    assert any("127.0.0.2:3260,2" in r for r in match.reasons)
    assert any("target port group 20: no portal" in r for r in match.reasons)


def test_match_without_any_observation_places_nothing():
    match = agent_portals.match_sendtargets([st_record(1), st_record(2)], IQN, {1: [1], 2: [2]}, observed={})
    assert match.members == () and len(match.unmatched) == 2


def test_match_reports_a_port_rtpg_does_not_list_and_a_bad_address():
    match = agent_portals.match_sendtargets([st_record(1), st_record(4), st_record(2, "not-an-ip")], IQN,
                                            {1: [1], 2: [2]}, observed={1: 1})
    assert placed(match) == {1: [("127.0.0.1:3260", 1, 1)]}
    assert match.unmatched == (st_record(4),)
    assert any("relative target port 4 is in no target port group" in r for r in match.reasons)
    assert any("not-an-ip" in r and "not an IP address" in r for r in match.reasons)


# LIO's VPD 0x83 on the path through TPG 1 of the lio-referrals rig (sg_inq -p 0x83 -H, 2026-12-06), shortened
# to the target-port designators: relative target port 1, target port group 1, "<iqn>,t,0x0001".
LIO_VPD83_TPG1 = bytes.fromhex(
    "00830048"
    "51940004 00000001"
    "51950004 00000001"
    "53980034") + b"iqn.2026-11.org.switch-agent:lio-referrals,t,0x0001".ljust(0x34, b"\0")


def test_observed_port_reads_the_tag_from_the_target_port_name():
    ids = scsi.decode_device_identification_vpd(LIO_VPD83_TPG1)
    assert agent_portals.observed_port(ids) == (1, 1)
    # The emulator names no target port: its paths tell their tag through sysfs only.
    assert agent_portals.observed_port(scsi.DeviceIdentificationVpd((
        scsi.relative_target_port_designator(2), scsi.target_port_group_designator(2)))) is None
    other = scsi.DeviceIdentificationVpd((scsi.relative_target_port_designator(7),
                                          scsi.scsi_name_string_designator(f"{IQN},t,0x00ff")))
    assert agent_portals.observed_port(other) == (255, 7)


def test_parse_sendtargets_reads_iscsiadms_lines():
    # As the guest printed it (docs/referrals.md), plus an IPv6 portal in iscsiadm's brackets.
    text = ("127.0.0.1:3260,1 iqn.2026-11.org.switch-agent:lio-referrals\n"
            "127.0.0.2:3260,2 iqn.2026-11.org.switch-agent:lio-referrals\n"
            "[fd00::3]:3261,3 iqn.2026-11.org.switch-agent:lio-referrals\n\n")
    records = agent_portals.parse_sendtargets(text)
    assert records == (st_record(1), st_record(2),
                       agent_portals.SendTargetsRecord("fd00::3", 3261, 3, IQN))
    match = agent_portals.match_sendtargets(records, IQN, {1: [1], 2: [2], 3: [3]}, observed={1: 1})
    assert placed(match)[3] == [("[fd00::3]:3261", 3, 3)]


@pytest.mark.parametrize("line", ["127.0.0.1:3260 iqn.x", "127.0.0.1,1 iqn.x", "127.0.0.1:0,1 iqn.x",
                                  "127.0.0.1:3260,70000 iqn.x", "iscsiadm: No portals found",
                                  "127.0.0.1:3260,1 iqn.x trailing"])
def test_parse_sendtargets_refuses_other_shapes(line):
    with pytest.raises(ValueRangeError) as info:
        agent_portals.parse_sendtargets(f"127.0.0.2:3260,2 {IQN}\n{line}\n")
    assert info.value.field == "line 2"
