"""Standard INQUIRY and VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB3 (protocol.scsi.inquiry/vpd)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import scsi
from protocol.errors import BadMagicError, EncodeError, TruncatedError, ValueRangeError
from protocol.scsi import (
    Association,
    BlockLimitsVpd,
    CodeSet,
    Designator,
    DesignatorType,
    DeviceIdentificationVpd,
    NaaIdentifier,
    ProtocolId,
    ReferralsVpd,
    StandardInquiry,
    SupportedVpdPages,
    Tpgs,
    UnitSerialNumberVpd,
    VpdPage,
    decode_block_limits_vpd,
    decode_device_identification_vpd,
    decode_referrals_vpd,
    decode_standard_inquiry,
    decode_supported_vpd_pages,
    decode_unit_serial_number_vpd,
    decode_vpd_page,
    encode_block_limits_vpd,
    encode_device_identification_vpd,
    encode_referrals_vpd,
    encode_standard_inquiry,
    encode_supported_vpd_pages,
    encode_unit_serial_number_vpd,
    encode_vpd_page,
    logical_unit_group_designator,
    naa_designator,
    relative_target_port_designator,
    scsi_name_string_designator,
    t10_vendor_id_designator,
    target_port_group_designator,
)
from tests.unit.test_scsi_sense import hexbytes

# -- standard INQUIRY ----------------------------------------------------------------------

# sg3_utils inhex/inq_standard.hex (Linux scsi_debug), first 36 bytes.
SCSI_DEBUG_INQUIRY = hexbytes("""
    00 00 07 02 5b 00 10 0a  4c 69 6e 75 78 20 20 20
    73 63 73 69 5f 64 65 62  75 67 20 20 20 20 20 20
    30 31 39 31 32 30 32 31  30 35 32 30 00 00 00 00
""")


def test_decode_scsi_debug_standard_inquiry() -> None:
    inq = decode_standard_inquiry(SCSI_DEBUG_INQUIRY)
    assert (inq.vendor, inq.product, inq.revision) == ("Linux", "scsi_debug", "0191")
    assert inq.peripheral_device_type == 0 and inq.peripheral_qualifier == 0
    assert inq.version == 7 and inq.response_data_format == 2
    assert inq.multi_port and inq.command_queueing and inq.tpgs is Tpgs.NOT_SUPPORTED


def test_lio_standard_inquiry_bytes() -> None:
    # spc_emulate_inquiry_std with implicit ALUA: buf[2]=5, buf[3]=2, buf[4]=31,
    # buf[5]=0x80|0x10 (SCCS, TPGS implicit), buf[7]=2 (CmdQue), space-padded strings.
    lio = (bytes([0, 0, 5, 2, 31, 0x90, 0, 2]) + b"LIO-ORG " + b"TCMU device     " + b"0002")
    inq = StandardInquiry(vendor="LIO-ORG", product="TCMU device", revision="0002", version=5,
                          sccs=True, tpgs=Tpgs.IMPLICIT)
    assert encode_standard_inquiry(inq) == lio
    assert decode_standard_inquiry(lio) == inq


def test_inquiry_strings_sanitized_like_the_kernel() -> None:
    raw = bytearray(encode_standard_inquiry(StandardInquiry(vendor="EQLOGIC", product="100E-00",
                                                            revision="8.1")))
    raw[16:24] = b"AB\x01CD\x00XY"  # control byte -> space; NUL ends the string
    assert decode_standard_inquiry(bytes(raw)).product == "AB CD"
    with pytest.raises(TruncatedError) as e:
        decode_standard_inquiry(bytes(raw[:35]))
    assert e.value.expected == 36
    with pytest.raises(EncodeError):
        encode_standard_inquiry(StandardInquiry(vendor="TOOLONGVENDOR", product="", revision=""))
    with pytest.raises(EncodeError):
        encode_standard_inquiry(StandardInquiry(vendor="caf\u00e9", product="", revision=""))


printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=4)


@settings(max_examples=40)
@given(vendor=printable, product=printable, revision=printable, pdt=st.integers(0, 31),
       pq=st.integers(0, 7), tpgs=st.sampled_from(Tpgs), flags=st.lists(st.booleans(), min_size=10,
                                                                        max_size=10))
def test_standard_inquiry_round_trip(vendor: str, product: str, revision: str, pdt: int, pq: int,
                                     tpgs: Tpgs, flags: list[bool]) -> None:
    inq = StandardInquiry(
        vendor=vendor, product=product, revision=revision, peripheral_device_type=pdt,
        peripheral_qualifier=pq, tpgs=tpgs, removable=flags[0], normaca=flags[1], hisup=flags[2],
        sccs=flags[3], acc=flags[4], third_party_copy=flags[5], protect=flags[6],
        enclosure_services=flags[7], multi_port=flags[8], command_queueing=flags[9])
    raw = encode_standard_inquiry(inq)
    assert len(raw) == 36 and raw[4] == 31
    assert decode_standard_inquiry(raw) == inq


# -- generic VPD header ------------------------------------------------------------------


def test_vpd_header_for_a_vendor_page() -> None:
    raw = encode_vpd_page(0xC0, b"SAMI\x01", peripheral_device_type=0)
    assert raw == bytes.fromhex("00c00005") + b"SAMI\x01"
    assert decode_vpd_page(raw, 0xC0) == VpdPage(0xC0, b"SAMI\x01")
    assert decode_vpd_page(raw + b"\0" * 8).payload == b"SAMI\x01"  # excess ignored
    with pytest.raises(BadMagicError):
        decode_vpd_page(raw, 0x83)
    with pytest.raises(TruncatedError) as e:
        decode_vpd_page(raw[:6])
    assert e.value.expected == 9


# -- sg3_utils scsi_debug pages (inhex/vpd_sdeb.hex) ----------------------------------------

SDEB_00 = hexbytes("00 00 00 0c 00 80 83 84  85 86 87 88 89 b0 b1 b2")
SDEB_80 = hexbytes("00 80 00 04 32 30 30 30")
SDEB_83 = hexbytes("""
    00 83 00 70 02 01 00 1c  4c 69 6e 75 78 20 20 20
    73 63 73 69 5f 64 65 62  75 67 20 20 20 20 20 20
    32 30 30 30 01 03 00 08  33 33 33 30 00 00 07 d0
    61 94 00 04 00 00 00 01  61 93 00 08 32 22 22 20
    00 00 07 ce 61 95 00 04  00 00 01 00 61 a3 00 08
    32 22 22 20 00 00 07 cd  63 a8 00 18 6e 61 61 2e
    33 32 32 32 32 32 32 30  30 30 30 30 30 37 43 44
    00 00 00 00
""")
SDEB_B0 = hexbytes("""
    00 b0 00 3c 00 00 00 01  00 00 40 00 00 00 04 00
    00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 01
    00 00 00 00 00 00 00 00  00 00 ff ff 00 00 00 00
    00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
""")


def test_scsi_debug_supported_pages_and_serial() -> None:
    assert decode_supported_vpd_pages(SDEB_00).page_codes == (
        0x00, 0x80, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0xB0, 0xB1, 0xB2)
    assert encode_supported_vpd_pages(decode_supported_vpd_pages(SDEB_00)) == SDEB_00
    assert decode_unit_serial_number_vpd(SDEB_80) == UnitSerialNumberVpd("2000")
    assert encode_unit_serial_number_vpd(UnitSerialNumberVpd("2000")) == SDEB_80


def test_scsi_debug_device_identification() -> None:
    page = decode_device_identification_vpd(SDEB_83)
    types = [(d.designator_type, d.association) for d in page.designators]
    assert types == [
        (DesignatorType.T10_VENDOR_ID, Association.LOGICAL_UNIT),
        (DesignatorType.NAA, Association.LOGICAL_UNIT),
        (DesignatorType.RELATIVE_TARGET_PORT, Association.TARGET_PORT),
        (DesignatorType.NAA, Association.TARGET_PORT),
        (DesignatorType.TARGET_PORT_GROUP, Association.TARGET_PORT),
        (DesignatorType.NAA, Association.TARGET_DEVICE),
        (DesignatorType.SCSI_NAME_STRING, Association.TARGET_DEVICE),
    ]
    t10 = page.designators[0].t10_vendor_id
    assert t10.vendor == "Linux" and t10.vendor_specific_identifier.startswith(b"scsi_debug")
    naa = page.logical_unit_naa()
    assert naa == NaaIdentifier(3, 0, 0x3333330000007D0)
    assert naa.wwid == "333333330000007d0"
    assert page.relative_target_port_id() == 1
    assert page.target_port_group_id() == 0x100
    rtp = page.designators[2]
    assert rtp.piv and rtp.protocol_id is ProtocolId.SAS and rtp.code_set is CodeSet.BINARY
    assert page.designators[6].scsi_name == "naa.32222220000007CD"
    assert page.designators[3].naa == NaaIdentifier(3, 0, 0x2222220000007CE)
    assert encode_device_identification_vpd(page) == SDEB_83


def test_scsi_debug_block_limits() -> None:
    bl = decode_block_limits_vpd(SDEB_B0)
    assert bl == BlockLimitsVpd(optimal_transfer_length_granularity_blocks=1,
                                maximum_transfer_length_blocks=0x4000,
                                optimal_transfer_length_blocks=0x400,
                                optimal_unmap_granularity_blocks=1,
                                maximum_write_same_length_blocks=0xFFFF)
    assert encode_block_limits_vpd(bl) == SDEB_B0


def test_sg3_utils_block_limits_and_referrals_samples() -> None:
    # inhex/vpd_bl.hex (PAGE LENGTH 0x3e, longer than we model) and inhex/vpd_ref.hex.
    bl = decode_block_limits_vpd(hexbytes("""
        00 b0 00 3e 00 00 00 08  00 00 ff ff 00 00 00 00
        00 00 00 00 00 06 00 00  00 00 02 00 00 00 00 08
        00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
        00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
        00 14"""))
    assert (bl.optimal_transfer_length_granularity_blocks, bl.maximum_transfer_length_blocks,
            bl.maximum_unmap_lba_count, bl.maximum_unmap_block_descriptor_count,
            bl.optimal_unmap_granularity_blocks) == (8, 0xFFFF, 0x60000, 0x200, 8)
    ref = hexbytes("00 b3 00 0c  00 00 00 00  11 22 33 44  00 00 10 00")
    assert decode_referrals_vpd(ref) == ReferralsVpd(0x11223344, 0x1000)
    assert encode_referrals_vpd(ReferralsVpd(0x11223344, 0x1000)) == ref


def test_lio_short_block_limits_page() -> None:
    # spc_emulate_evpd_b0 without thin provisioning: PAGE LENGTH 0x10, WSNZ=1,
    # OTLG 1, MTL = hw_max_sectors (128), OTL = optimal_sectors.
    raw = bytes.fromhex("00b00010" "01000001" "00000080" "00000080" "00000000")
    bl = decode_block_limits_vpd(raw)
    assert bl.write_same_non_zero and bl.maximum_transfer_length_blocks == 128
    assert bl.maximum_unmap_lba_count == 0
    with pytest.raises(ValueRangeError):
        decode_block_limits_vpd(bytes.fromhex("00b00008" + "00" * 8))


# -- sg3_utils inhex/vpd_di_all.hex: one designator of every type -----------------------


def test_every_designator_type_decodes() -> None:
    raw = hexbytes("""
        00 83 01 04
        01 00 00 16 11 22 33 44  55 66 77 88 99 aa bb cc dd ee ff ed cb a9 87 65  43 21
        02 01 00 14 41 42 43 20 20 20 20 20 58 59 5a 31 32 33 34 35  36 37 38 39
        01 02 00 08 11 22 33 44  55 66 77 88
        01 02 00 0c 11 22 33 44  55 66 77 88 00 00 01 23
        01 02 00 10 01 23 45 67  89 ab cd ef 11 22 33 44  55 66 77 88
        01 03 00 08 51 22 33 44  55 66 77 88
        01 03 00 10 61 22 33 44  55 66 77 88 aa bb cc dd  ee ff ee dd
        01 14 00 04 00 00 00 02
        01 15 00 04 00 00 00 03
        01 06 00 04 00 00 00 04
        01 07 00 10 ff ee dd cc  bb aa 99 88 77 66 55 44  33 22 11 00
        03 28 00 28
        69 71 6e 2e 35 38 38 36  2e 63 6f 6d 2e 61 63 6d 65 2e 64 69 73 6b 61 72  72 61 79 73
        2d 73 6e 2d 61 38 36 37 35 33 30 39
        91 99 00 04 04 00 02 00
        a1 99 00 08 01 23 00 00  00 00 00 00
        01 0a 00 12 10 00 11 22  33 44 55 66 77 88 99 aa bb cc dd ee fe dc
    """)
    page = decode_device_identification_vpd(raw)
    assert len(page.designators) == 15
    naa5, naa6 = page.find(DesignatorType.NAA)
    assert naa5.naa == NaaIdentifier(5, 0x122334, 0x455667788)
    assert naa6.naa == NaaIdentifier(6, 0x122334, 0x455667788, 0xAABBCCDDEEFFEEDD)
    assert page.logical_unit_naa() == naa6.naa  # NAA 6 preferred
    assert page.designators[1].t10_vendor_id.vendor == "ABC"
    # association target port (0x10) in byte 1 of the type 4 and 5 designators
    assert page.relative_target_port_id() == 2
    assert page.target_port_group_id() == 3
    assert page.designators[9].logical_unit_group_id == 4
    assert page.designators[11].scsi_name == "iqn.5886.com.acme.diskarrays-sn-a8675309"
    usb = page.designators[12]
    assert usb.piv and usb.protocol_id == 9 and usb.designator_type == 9
    assert page.designators[14].designator_type is DesignatorType.UUID
    assert encode_device_identification_vpd(page) == raw


# -- LIO's page 0x83, byte by byte from spc_emulate_evpd_83 -----------------------------

LIO_SERIAL = "a5b0d1e2-f3c4-4d5e-8f90-123456789abc"
LIO_IQN = "iqn.2003-01.org.linux-iscsi.host.x8664:sn.0123456789ab"


def _lio_name(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


def lio_page_83() -> bytes:
    """VPD 0x83 exactly as LIO builds it for an iSCSI LUN with an ALUA group and LU group."""
    naa = bytes.fromhex("6001405a5b0d1e2f3c44d5e8f9012345")  # 6, OUI 001405, serial nibbles
    t10_id = b"LIO-ORG " + f"TCMU device:{LIO_SERIAL}".encode() + b"\0"
    port_name = _lio_name(LIO_IQN + ",t,0x0001")
    device_name = _lio_name(LIO_IQN)
    body = (
        bytes([0x01, 0x03, 0x00, 0x10]) + naa
        + bytes([0x02, 0x01, 0x00, len(t10_id)]) + t10_id
        + bytes([0x51, 0x94, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01])  # RTPI 1, iSCSI, PIV
        + bytes([0x51, 0x95, 0x00, 0x04, 0x00, 0x00, 0x00, 0x07])  # TPG 7
        + bytes([0x01, 0x06, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])  # LU group 0
        + bytes([0x53, 0x98, 0x00, len(port_name)]) + port_name
        + bytes([0x53, 0xA8, 0x00, len(device_name)]) + device_name
    )
    return bytes([0x00, 0x83]) + len(body).to_bytes(2, "big") + body


def test_decode_lio_page_83() -> None:
    page = decode_device_identification_vpd(lio_page_83())
    naa = page.logical_unit_naa()
    assert naa == NaaIdentifier(6, 0x001405, 0xA5B0D1E2F, 0x3C44D5E8F9012345)
    assert naa.wwid == "36001405a5b0d1e2f3c44d5e8f9012345"  # what multipath shows for LIO
    assert page.relative_target_port_id() == 1
    assert page.target_port_group_id() == 7
    names = page.find(DesignatorType.SCSI_NAME_STRING)
    assert [n.scsi_name for n in names] == [LIO_IQN + ",t,0x0001", LIO_IQN]
    assert [n.association for n in names] == [Association.TARGET_PORT, Association.TARGET_DEVICE]


def test_encode_lio_page_83_with_the_builders() -> None:
    page = DeviceIdentificationVpd((
        naa_designator(NaaIdentifier(6, 0x001405, 0xA5B0D1E2F, 0x3C44D5E8F9012345)),
        t10_vendor_id_designator("LIO-ORG", f"TCMU device:{LIO_SERIAL}".encode() + b"\0"),
        relative_target_port_designator(1),
        target_port_group_designator(7),
        logical_unit_group_designator(0),
        scsi_name_string_designator(LIO_IQN + ",t,0x0001"),
        scsi_name_string_designator(LIO_IQN, association=Association.TARGET_DEVICE),
    ))
    assert encode_device_identification_vpd(page) == lio_page_83()


def test_designator_views_check_type_and_length() -> None:
    page = decode_device_identification_vpd(lio_page_83())
    with pytest.raises(BadMagicError):
        page.designators[0].relative_target_port_id  # noqa: B018
    bad = decode_device_identification_vpd(bytes.fromhex("00830008" "01030004" "60014050"))
    with pytest.raises(ValueRangeError):
        bad.logical_unit_naa()
    with pytest.raises(ValueRangeError):  # designator overruns the page
        decode_device_identification_vpd(bytes.fromhex("00830006" "01030008" "6001"))
    with pytest.raises(EncodeError):
        scsi_name_string_designator("x" * 256)
    with pytest.raises(EncodeError):
        NaaIdentifier(5, 1 << 24, 0).to_bytes()
    with pytest.raises(EncodeError):
        NaaIdentifier(4, 0, 0).to_bytes()


@settings(max_examples=60)
@given(fmt=st.sampled_from([2, 3, 5, 6]), oui=st.integers(0, (1 << 24) - 1),
       vsi=st.integers(0, (1 << 36) - 1), local=st.integers(0, (1 << 60) - 1),
       ext=st.integers(0, (1 << 64) - 1))
def test_naa_round_trip(fmt: int, oui: int, vsi: int, local: int, ext: int) -> None:
    naa = {2: NaaIdentifier(2, oui, vsi), 3: NaaIdentifier(3, 0, local),
           5: NaaIdentifier(5, oui, vsi), 6: NaaIdentifier(6, oui, vsi, ext)}[fmt]
    raw = naa.to_bytes()
    assert len(raw) == (16 if fmt == 6 else 8) and raw[0] >> 4 == fmt
    assert NaaIdentifier.from_bytes(raw) == naa
    assert naa.wwid == "3" + raw.hex()


designator = st.builds(
    Designator, designator_type=st.integers(0, 15), value=st.binary(max_size=40),
    association=st.integers(0, 2), code_set=st.integers(0, 15), protocol_id=st.integers(0, 15),
    piv=st.booleans())


@settings(max_examples=40)
@given(designators=st.lists(designator, max_size=5), pages=st.sets(st.integers(0, 255)),
       serial=printable, size=st.integers(0, (1 << 32) - 1), mult=st.integers(0, (1 << 32) - 1))
def test_vpd_round_trips(designators: list, pages: set[int], serial: str, size: int,
                         mult: int) -> None:
    di = DeviceIdentificationVpd(tuple(designators))
    assert decode_device_identification_vpd(encode_device_identification_vpd(di)) == di
    sp = SupportedVpdPages(tuple(sorted(pages)))
    assert decode_supported_vpd_pages(encode_supported_vpd_pages(sp)) == sp
    us = UnitSerialNumberVpd(serial)
    assert decode_unit_serial_number_vpd(encode_unit_serial_number_vpd(us)) == us
    ref = ReferralsVpd(size, mult)
    assert decode_referrals_vpd(encode_referrals_vpd(ref)) == ref


@settings(max_examples=30)
@given(values=st.lists(st.integers(0, (1 << 31) - 1), min_size=12, max_size=12),
       flags=st.lists(st.booleans(), min_size=2, max_size=2))
def test_block_limits_round_trip(values: list[int], flags: list[bool]) -> None:
    bl = BlockLimitsVpd(
        write_same_non_zero=flags[0], unmap_granularity_alignment_valid=flags[1],
        maximum_compare_and_write_length_blocks=values[0] & 0xFF,
        optimal_transfer_length_granularity_blocks=values[1] & 0xFFFF,
        maximum_transfer_length_blocks=values[2], optimal_transfer_length_blocks=values[3],
        maximum_prefetch_length_blocks=values[4], maximum_unmap_lba_count=values[5],
        maximum_unmap_block_descriptor_count=values[6],
        optimal_unmap_granularity_blocks=values[7],
        unmap_granularity_alignment_blocks=values[8],
        maximum_write_same_length_blocks=values[9] << 20)
    raw = encode_block_limits_vpd(bl)
    assert len(raw) == 64
    assert decode_block_limits_vpd(raw) == bl


def test_vpd_encoders_reject_bad_input() -> None:
    with pytest.raises(EncodeError):
        encode_supported_vpd_pages(SupportedVpdPages((0x80, 0x00)))
    with pytest.raises(EncodeError):
        encode_unit_serial_number_vpd(UnitSerialNumberVpd("sn\n1"))
    with pytest.raises(EncodeError):
        encode_vpd_page(0x100, b"")
    with pytest.raises(EncodeError):
        encode_referrals_vpd(ReferralsVpd(1 << 32, 0))


def test_standard_inquiry_with_version_descriptors_round_trips():
    inq = scsi.StandardInquiry(vendor="SWAGENT", product="PAGEMAP ARRAY", revision="0001",
                               version_descriptors=(0x00A0, 0x0460, 0x04C0, 0x0960))
    data = scsi.encode_standard_inquiry(inq)
    assert len(data) == 96 and data[4] == 91 and data[58:66] == bytes.fromhex("00a0046004c00960")
    assert scsi.decode_standard_inquiry(data) == inq
    # Truncated to 36 bytes (a short allocation length), the descriptors are simply absent.
    assert scsi.decode_standard_inquiry(data[:36]).version_descriptors == ()
    assert len(scsi.encode_standard_inquiry(scsi.StandardInquiry(vendor="A", product="B", revision="1"))) == 36
