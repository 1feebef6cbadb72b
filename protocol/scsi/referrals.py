"""SBC-3 REPORT REFERRALS parameter data and user data segment referral descriptors.

Layout (SBC-3 5.21.2, r35 as LIO implements it in target_core_alua.c
``target_emulate_report_referrals``; decoded by sg3_utils src/sg_referrals.c):

  header      bytes 0-1 reserved, 2-3 RETURN DATA LENGTH (bytes after the header)
  descriptor  bytes 0-2 reserved, 3 NUMBER OF TARGET PORT GROUP DESCRIPTORS,
              4-11 FIRST USER DATA SEGMENT LBA, 12-19 LAST USER DATA SEGMENT LBA,
              then 4 bytes per group: 0 ASYMMETRIC ACCESS STATE (bits 3-0),
              1 reserved, 2-3 TARGET PORT GROUP

sg3_utils reads the length as a 4-byte field (bytes 0-3), anticipating the
reserved bytes being used; with them zero, as the spec and LIO have them,
both readings agree. We write them zero and read bytes 2-3.

The same descriptors appear in the sense-data descriptor type 0x0B
(user data segment referral), handled by ``protocol.scsi.sense``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import EncodeError, ValueRangeError
from protocol.scsi._wire import Buffer, check_uint, need
from protocol.scsi.constants import AluaState

__all__ = [
    "ReferralTargetPortGroup", "UserDataSegmentReferral", "ReportReferralsData",
    "encode_report_referrals", "decode_report_referrals",
    "encode_referral_descriptors", "decode_referral_descriptors",
]

_CODEC = "REPORT REFERRALS data"
_HEADER = struct.Struct(">2xH")
_SEGMENT = struct.Struct(">3xBQQ")  # reserved, group count, first LBA, last LBA
_GROUP = struct.Struct(">BxH")  # access state (bits 3-0), reserved, target port group
MAX_GROUPS_PER_SEGMENT = 255


@dataclass(frozen=True)
class ReferralTargetPortGroup:
    """One target port group a segment is reachable through, and its state for that segment."""

    asymmetric_access_state: AluaState
    target_port_group_id: int


@dataclass(frozen=True)
class UserDataSegmentReferral:
    """A user data segment (``first_lba``..``last_lba`` inclusive) and the groups serving it."""

    first_lba: int
    last_lba: int
    target_port_groups: tuple[ReferralTargetPortGroup, ...]

    @property
    def lba_count(self) -> int:
        """Number of logical blocks in the segment."""
        return self.last_lba - self.first_lba + 1


@dataclass(frozen=True)
class ReportReferralsData:
    """REPORT REFERRALS parameter data: the segments, in the order the device sent them."""

    segments: tuple[UserDataSegmentReferral, ...]


def encode_referral_descriptors(segments: tuple[UserDataSegmentReferral, ...] | list[UserDataSegmentReferral],
                                codec: str = _CODEC) -> bytes:
    """The concatenated user data segment referral descriptors, without any header."""
    out = bytearray()
    for i, seg in enumerate(segments):
        field = f"segment {i}"
        check_uint(codec, f"{field} FIRST LBA", seg.first_lba, 64)
        check_uint(codec, f"{field} LAST LBA", seg.last_lba, 64)
        if seg.last_lba < seg.first_lba:
            raise EncodeError(f"{codec}: {field}: last LBA {seg.last_lba} < first {seg.first_lba}")
        if len(seg.target_port_groups) > MAX_GROUPS_PER_SEGMENT:
            raise EncodeError(f"{codec}: {field}: at most {MAX_GROUPS_PER_SEGMENT} groups")
        out += _SEGMENT.pack(len(seg.target_port_groups), seg.first_lba, seg.last_lba)
        for group in seg.target_port_groups:
            state = check_uint(codec, f"{field} ASYMMETRIC ACCESS STATE",
                               group.asymmetric_access_state, 4)
            if state not in AluaState._value2member_map_:
                raise EncodeError(f"{codec}: {field}: reserved access state {state:#x}")
            check_uint(codec, f"{field} TARGET PORT GROUP", group.target_port_group_id, 16)
            out += _GROUP.pack(state, group.target_port_group_id)
    return bytes(out)


def decode_referral_descriptors(body: bytes, codec: str = _CODEC
                                ) -> tuple[UserDataSegmentReferral, ...]:
    """Decode descriptors filling exactly ``body``; an overrun is ValueRangeError."""
    segments: list[UserDataSegmentReferral] = []
    offset = 0
    while offset < len(body):
        field = f"segment {len(segments)}"
        if offset + _SEGMENT.size > len(body):
            raise ValueRangeError(codec, f"{field} descriptor",
                                  f"{_SEGMENT.size} bytes", len(body) - offset)
        count, first, last = _SEGMENT.unpack_from(body, offset)
        offset += _SEGMENT.size
        if offset + count * _GROUP.size > len(body):
            raise ValueRangeError(codec, f"{field} target port group descriptors",
                                  f"{count * _GROUP.size} bytes", len(body) - offset)
        if last < first:
            raise ValueRangeError(codec, f"{field} LAST LBA", f">= {first}", last)
        groups: list[ReferralTargetPortGroup] = []
        for _ in range(count):
            state, tpg = _GROUP.unpack_from(body, offset)
            offset += _GROUP.size
            try:
                access_state = AluaState(state & 0x0F)
            except ValueError:
                raise ValueRangeError(codec, f"{field} ASYMMETRIC ACCESS STATE",
                                      "0-4, 0xe or 0xf", hex(state & 0x0F)) from None
            groups.append(ReferralTargetPortGroup(access_state, tpg))
        segments.append(UserDataSegmentReferral(first, last, tuple(groups)))
    return tuple(segments)


def encode_report_referrals(data: ReportReferralsData) -> bytes:
    """Array side: the full REPORT REFERRALS parameter data (header + descriptors)."""
    body = encode_referral_descriptors(data.segments)
    if len(body) > 0xFFFF:
        raise EncodeError(f"{_CODEC}: {len(body)} bytes of descriptors exceed the 16-bit length")
    return _HEADER.pack(len(body)) + body


def decode_report_referrals(data: Buffer) -> ReportReferralsData:
    """Host side: decode REPORT REFERRALS parameter data.

    A response cut short by the allocation length raises TruncatedError whose
    ``expected`` is the full length; bytes past the declared length are ignored.
    """
    raw = bytes(data)
    need(_CODEC, "header", raw, _HEADER.size)
    (length,) = _HEADER.unpack_from(raw)
    need(_CODEC, f"data (RETURN DATA LENGTH {length})", raw, _HEADER.size + length)
    return ReportReferralsData(decode_referral_descriptors(raw[4:4 + length]))
