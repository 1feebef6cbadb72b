"""REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36.2).

  header   0-3 RETURN DATA LENGTH (bytes after byte 3);
           extended format only: 4 FORMAT TYPE (bits 6-4 = 001b),
           5 IMPLICIT TRANSITION TIME (seconds), 6-7 reserved
  group    0 PREF (bit 7) | ASYMMETRIC ACCESS STATE (3-0), 1 T_SUP O_SUP - LBD_SUP
           U_SUP S_SUP AN_SUP AO_SUP, 2-3 TARGET PORT GROUP, 4 reserved,
           5 STATUS CODE, 6 vendor specific, 7 TARGET PORT COUNT,
           then per port: 0-1 obsolete, 2-3 RELATIVE TARGET PORT IDENTIFIER

The format is recognised from byte 4 bits 6-4, which are reserved (0) in
the first group descriptor of the length-only format, as sg3_utils'
sg_rtpg and the kernel's scsi_dh_alua do. RETURN DATA LENGTH counts the
extended header too (sg_rtpg, scsi_dh_alua); note LIO's
target_emulate_report_target_port_groups leaves those 4 bytes out of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntFlag

from protocol.errors import EncodeError, ValueRangeError
from protocol.scsi._wire import Buffer, check_uint, need
from protocol.scsi.constants import AluaState

__all__ = [
    "SupportedAluaStates", "TargetPortGroupDescriptor", "ReportTargetPortGroupsData",
    "encode_report_target_port_groups", "decode_report_target_port_groups",
    "RTPG_STATUS_NO_STATUS", "RTPG_STATUS_ALTERED_BY_SET_TPG",
    "RTPG_STATUS_ALTERED_BY_IMPLICIT_TRANSITION",
]

_CODEC = "REPORT TARGET PORT GROUPS data"
_GROUP = struct.Struct(">BBHxBBB")
_PORT = struct.Struct(">2xH")
_EXTENDED_FORMAT = 0x10  # byte 4 bits 6-4 = 001b
_PREF = 0x80

RTPG_STATUS_NO_STATUS = 0x00
RTPG_STATUS_ALTERED_BY_SET_TPG = 0x01
RTPG_STATUS_ALTERED_BY_IMPLICIT_TRANSITION = 0x02


class SupportedAluaStates(IntFlag):
    """Byte 1 of a target port group descriptor: the states the group supports."""

    AO_SUP = 0x01
    AN_SUP = 0x02
    S_SUP = 0x04
    U_SUP = 0x08
    LBD_SUP = 0x10
    O_SUP = 0x40
    T_SUP = 0x80


@dataclass(frozen=True, kw_only=True)
class TargetPortGroupDescriptor:
    """One target port group: its state and the relative target ports in it."""

    target_port_group_id: int
    asymmetric_access_state: AluaState
    preferred: bool = False
    supported_states: SupportedAluaStates = SupportedAluaStates(0)
    status_code: int = RTPG_STATUS_NO_STATUS
    vendor_specific: int = 0
    relative_target_port_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReportTargetPortGroupsData:
    """RTPG data; ``implicit_transition_time_seconds`` is None in the length-only format."""

    groups: tuple[TargetPortGroupDescriptor, ...]
    implicit_transition_time_seconds: int | None = field(default=None)


def encode_report_target_port_groups(data: ReportTargetPortGroupsData) -> bytes:
    """Array side: RTPG data; extended format iff ``implicit_transition_time_seconds`` is set."""
    body = bytearray()
    if data.implicit_transition_time_seconds is not None:
        check_uint(_CODEC, "IMPLICIT TRANSITION TIME", data.implicit_transition_time_seconds, 8)
        body += bytes([_EXTENDED_FORMAT, data.implicit_transition_time_seconds, 0, 0])
    for i, g in enumerate(data.groups):
        name = f"group {i}"
        state = check_uint(_CODEC, f"{name} ASYMMETRIC ACCESS STATE", g.asymmetric_access_state, 4)
        if state not in AluaState._value2member_map_:
            raise EncodeError(f"{_CODEC}: {name}: reserved access state {state:#x}")
        check_uint(_CODEC, f"{name} supported states", int(g.supported_states), 8)
        check_uint(_CODEC, f"{name} TARGET PORT GROUP", g.target_port_group_id, 16)
        check_uint(_CODEC, f"{name} STATUS CODE", g.status_code, 8)
        check_uint(_CODEC, f"{name} vendor specific", g.vendor_specific, 8)
        if len(g.relative_target_port_ids) > 0xFF:
            raise EncodeError(f"{_CODEC}: {name}: at most 255 target ports")
        body += _GROUP.pack((_PREF if g.preferred else 0) | state, int(g.supported_states),
                            g.target_port_group_id, g.status_code, g.vendor_specific,
                            len(g.relative_target_port_ids))
        for port in g.relative_target_port_ids:
            check_uint(_CODEC, f"{name} RELATIVE TARGET PORT IDENTIFIER", port, 16)
            body += _PORT.pack(port)
    check_uint(_CODEC, "RETURN DATA LENGTH", len(body), 32)
    return len(body).to_bytes(4, "big") + bytes(body)


def decode_report_target_port_groups(data: Buffer) -> ReportTargetPortGroupsData:
    """Host side: decode RTPG data in either format.

    TruncatedError (``expected`` = 4 + RETURN DATA LENGTH) if the allocation
    length cut the data short; a group overrunning the length is ValueRangeError.
    """
    raw = bytes(data)
    need(_CODEC, "header", raw, 4)
    length = int.from_bytes(raw[:4], "big")
    total = 4 + length
    need(_CODEC, f"data (RETURN DATA LENGTH {length})", raw, total)
    offset = 4
    implicit_time = None
    if length:
        data_format = (raw[4] >> 4) & 0x07
        if data_format == 1:
            if length < 4:
                raise ValueRangeError(_CODEC, "RETURN DATA LENGTH (extended header)", ">= 4",
                                      length)
            implicit_time = raw[5]
            offset = 8
        elif data_format != 0:
            raise ValueRangeError(_CODEC, "FORMAT TYPE", "0 or 1", data_format)
    groups: list[TargetPortGroupDescriptor] = []
    while offset < total:
        name = f"group {len(groups)}"
        if offset + _GROUP.size > total:
            raise ValueRangeError(_CODEC, f"{name} descriptor", f"{_GROUP.size} bytes",
                                  total - offset)
        b0, supported, tpg, status, vendor, count = _GROUP.unpack_from(raw, offset)
        offset += _GROUP.size
        if offset + count * _PORT.size > total:
            raise ValueRangeError(_CODEC, f"{name} TARGET PORT COUNT",
                                  f"<= {(total - offset) // _PORT.size}", count)
        try:
            state = AluaState(b0 & 0x0F)
        except ValueError:
            raise ValueRangeError(_CODEC, f"{name} ASYMMETRIC ACCESS STATE", "0-4, 0xe or 0xf",
                                  hex(b0 & 0x0F)) from None
        ports = tuple(_PORT.unpack_from(raw, offset + k * _PORT.size)[0] for k in range(count))
        offset += count * _PORT.size
        groups.append(TargetPortGroupDescriptor(
            target_port_group_id=tpg, asymmetric_access_state=state,
            preferred=bool(b0 & _PREF), supported_states=SupportedAluaStates(supported),
            status_code=status, vendor_specific=vendor, relative_target_port_ids=ports,
        ))
    return ReportTargetPortGroupsData(tuple(groups), implicit_time)
