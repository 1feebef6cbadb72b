"""Sense data, fixed and descriptor formats (protocol.scsi.sense)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadMagicError, EncodeError, TruncatedError, ValueRangeError
from protocol.scsi import (
    AdditionalSense,
    AluaState,
    FieldPointer,
    ReferralTargetPortGroup,
    Sense,
    SenseKey,
    UserDataSegmentReferral,
    decode_sense,
    encode_sense,
)


def hexbytes(text: str) -> bytes:
    """Bytes from sg3_utils-style hex: comments after '#', commas or spaces between bytes."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return bytes(int(tok, 16) for line in lines for tok in line.replace(",", " ").split())


# -- real bytes ------------------------------------------------------------------------


def test_sg3_utils_fixed_sense_hex() -> None:
    # sg3_utils inhex/fixed_sense.hex: VALID, MEDIUM ERROR, info 0x1234, 11/00, SKS 80 01 98.
    raw = hexbytes("f0 00 03 00 00 12 34 0a  00 00 00 00 11 00 77 80 01 98")
    sense = decode_sense(raw)
    assert sense.key is SenseKey.MEDIUM_ERROR
    assert (sense.asc, sense.ascq, sense.information) == (0x11, 0x00, 0x1234)
    assert sense.sense_key_specific == bytes.fromhex("800198")
    assert not sense.descriptor_format and not sense.deferred
    assert str(sense) == "MEDIUM ERROR: UNRECOVERED READ ERROR (11/00), information 0x1234"


def test_sg3_utils_descriptor_sense_hex() -> None:
    # sg3_utils inhex/descriptor_sense.hex: seven descriptors, including a referral.
    raw = hexbytes("""
        72 01 03 02 80 00 00 4c
        00 0a 80 00 11 22 33 44 55 66 77 bb
        01 0a 00 00 33 44 55 66 77 bb cc ff
        02 06 00 00 80 01 01 00
        03 02 00 45
        0a 06 02 01 02 00 32 01
        05 02 00 20
        0b 1a 01 00
        00 00 00 01 01 02 03 04 05 06 07 08
        01 02 03 04 55 06 07 08
        02 00 12 34
    """)
    sense = decode_sense(raw)
    assert sense.descriptor_format
    assert sense.key is SenseKey.RECOVERED_ERROR and (sense.asc, sense.ascq) == (3, 2)
    assert sense.information == 0x11223344556677BB
    assert sense.command_specific_information == 0x3344556677BBCCFF
    assert sense.sense_key_specific == bytes.fromhex("800101")
    assert sense.referrals == (UserDataSegmentReferral(
        0x0102030405060708, 0x0102030455060708,
        (ReferralTargetPortGroup(AluaState.STANDBY, 0x1234),)),)


def test_sg3_utils_referral_sense_hex() -> None:
    # sg3_utils inhex/ref_sense.hex: two segments, three groups.
    raw = hexbytes("""
        72,0,0,0,0,0,0,38
        b,36,1,0
        0,0,0,2,11,11,11,11,22,22,22,22,55,55,55,55,66,66,66,66, 1,0,0,7, 2,0,0,8
        0,0,0,1,77,77,77,77,77,77,77,77,88,88,88,88,88,88,88,88, 3,0,0,5
    """)
    sense = decode_sense(raw)
    assert sense.referrals is not None
    first, second = sense.referrals
    assert (first.first_lba, first.last_lba) == (0x1111111122222222, 0x5555555566666666)
    assert first.target_port_groups == (
        ReferralTargetPortGroup(AluaState.ACTIVE_NON_OPTIMIZED, 7),
        ReferralTargetPortGroup(AluaState.STANDBY, 8))
    assert second.target_port_groups == (ReferralTargetPortGroup(AluaState.UNAVAILABLE, 5),)
    assert sense.not_all_referrals
    assert encode_sense(sense) == raw  # the whole buffer comes back byte for byte


def test_lio_fixed_sense_bytes() -> None:
    # What LIO/TCMU and the kernel's scsi_build_sense_buffer(0, ...) write for
    # ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE: 70 00 05 ... 0a ... 20 00.
    raw = bytes.fromhex("700005000000000a00000000200000000000")
    assert encode_sense(Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)) == raw
    sense = decode_sense(raw)
    assert str(sense) == "ILLEGAL REQUEST: INVALID COMMAND OPERATION CODE (20/00)"
    assert sense.additional_sense is AdditionalSense.INVALID_COMMAND_OPERATION_CODE


def test_lio_descriptor_sense_bytes() -> None:
    # scsi_build_sense_buffer(1, ...): 72 key asc ascq 0 0 0 0 -- no descriptors.
    raw = bytes.fromhex("7206" "2a09" "00000000")
    sense = decode_sense(raw)
    assert sense == Sense(SenseKey.UNIT_ATTENTION, 0x2A, 0x09, descriptor_format=True)
    assert str(sense) == "UNIT ATTENTION: CAPACITY DATA HAS CHANGED (2a/09)"
    assert encode_sense(sense) == raw


# -- tolerance and strictness ---------------------------------------------------------


def test_short_fixed_sense_with_zero_additional_length() -> None:
    # 8-byte fixed sense, ADDITIONAL SENSE LENGTH 0: key only, codes read as 0.
    sense = decode_sense(bytes.fromhex("7000060000000000"))
    assert (sense.key, sense.asc, sense.ascq) == (SenseKey.UNIT_ATTENTION, 0, 0)
    # Bytes beyond ADDITIONAL SENSE LENGTH do not count (scsi_normalize_sense).
    sense = decode_sense(bytes.fromhex("700006000000000000000000" "2900"))
    assert (sense.asc, sense.ascq) == (0, 0)
    # A buffer cut at 14 bytes still yields the codes.
    sense = decode_sense(bytes.fromhex("700006000000000a00000000" "2900"))
    assert sense.additional_sense is AdditionalSense.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
    # A 96-byte sense buffer with trailing zeros is fine.
    assert decode_sense(encode_sense(Sense(SenseKey.NOT_READY, 4, 0)).ljust(96, b"\0")).key == 2


def test_truncated_descriptor_is_dropped_not_fatal() -> None:
    raw = bytes.fromhex("72052400" "0000000c" "000a8000" "0000")  # info descriptor cut short
    sense = decode_sense(raw)
    assert sense.information is None and sense.asc == 0x24


def test_garbage_raises_typed_errors() -> None:
    with pytest.raises(TruncatedError):
        decode_sense(b"")
    with pytest.raises(BadMagicError):
        decode_sense(bytes(18))
    with pytest.raises(BadMagicError):
        decode_sense(b"\x7f" + bytes(17))  # vendor-specific format
    with pytest.raises(TruncatedError):
        decode_sense(b"\x70\x00")
    with pytest.raises(TruncatedError):
        decode_sense(b"\x72\x05\x24")
    with pytest.raises(ValueRangeError):  # information descriptor of the wrong length
        decode_sense(bytes.fromhex("72052400" "00000006" "0004800000000000"))


# -- encoding ----------------------------------------------------------------------------


def test_field_pointer_round_trip() -> None:
    fp = FieldPointer(in_cdb=True, byte_offset=2, bit_index=7)
    sense = Sense.of(SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_FIELD_IN_CDB,
                     field_pointer=fp)
    raw = encode_sense(sense)
    assert raw[15:18] == bytes.fromhex("cf0002")  # SKSV | C/D | BPV | bit 7, field 2
    assert decode_sense(raw).field_pointer == fp
    desc = decode_sense(encode_sense(dataclasses.replace(sense, descriptor_format=True)))
    assert desc.field_pointer == fp
    assert Sense(SenseKey.UNIT_ATTENTION, 0x29, 0).field_pointer is None


def test_encode_rejects_what_fixed_format_cannot_carry() -> None:
    with pytest.raises(EncodeError):
        encode_sense(Sense(SenseKey.MEDIUM_ERROR, 0x11, 0, information=1 << 32))
    assert decode_sense(encode_sense(Sense(SenseKey.MEDIUM_ERROR, 0x11, 0, information=1 << 32,
                                           descriptor_format=True))).information == 1 << 32
    with pytest.raises(EncodeError):
        encode_sense(Sense(SenseKey.MEDIUM_ERROR, 0x11, 0, referrals=()))
    with pytest.raises(EncodeError):
        encode_sense(Sense(SenseKey.MEDIUM_ERROR, 0x100, 0))
    with pytest.raises(EncodeError):
        encode_sense(Sense(SenseKey.MEDIUM_ERROR, 0x11, 0, sense_key_specific=b"\x00\x00\x00"))


referral = st.builds(
    UserDataSegmentReferral,
    first_lba=st.integers(0, 1 << 40),
    last_lba=st.integers(1 << 40, (1 << 64) - 1),
    target_port_groups=st.lists(st.builds(ReferralTargetPortGroup, st.sampled_from(AluaState),
                                          st.integers(0, 0xFFFF)), max_size=3).map(tuple),
)


@settings(max_examples=60)
@given(key=st.sampled_from(SenseKey), asc=st.integers(0, 255), ascq=st.integers(0, 255),
       descriptor=st.booleans(), deferred=st.booleans(), data=st.data())
def test_sense_round_trip(key: SenseKey, asc: int, ascq: int, descriptor: bool, deferred: bool,
                          data: st.DataObject) -> None:
    info_bits = 64 if descriptor else 32
    info = data.draw(st.none() | st.integers(0, (1 << info_bits) - 1))
    csi = data.draw(st.none() | st.integers(1, (1 << info_bits) - 1))
    sks = data.draw(st.none() | st.binary(min_size=2, max_size=2).map(lambda b: b"\x80" + b))
    refs = data.draw(st.none() | st.lists(referral, max_size=2).map(tuple)) if descriptor else None
    not_all = refs is not None and data.draw(st.booleans())
    sense = Sense(key, asc, ascq, information=info, command_specific_information=csi,
                  sense_key_specific=sks, deferred=deferred, descriptor_format=descriptor,
                  referrals=refs, not_all_referrals=not_all)
    raw = encode_sense(sense)
    assert raw[0] & 0x7F == (0x72 if descriptor else 0x70) + deferred
    assert decode_sense(raw) == sense
    str(sense)
