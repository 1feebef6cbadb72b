"""Sense data, fixed (0x70/0x71) and descriptor (0x72/0x73) formats (SPC-4 4.5).

Both formats decode into one ``Sense``. Fixed format (SPC-4 4.5.3):

  0 VALID (bit 7) | RESPONSE CODE   2 sense key (bits 3-0)   3-6 INFORMATION
  7 ADDITIONAL SENSE LENGTH   8-11 COMMAND-SPECIFIC INFORMATION
  12 ASC   13 ASCQ   14 FRU code   15-17 SENSE KEY SPECIFIC (SKSV = bit 7 of 15)

Descriptor format (SPC-4 4.5.2): 0 RESPONSE CODE, 1 sense key, 2 ASC, 3 ASCQ,
7 ADDITIONAL SENSE LENGTH, then descriptors (type, additional length, ...):
0x00 information, 0x01 command-specific information, 0x02 sense key
specific, 0x0B user data segment referral (SBC-3 4.26.5).

Decoding is as tolerant as the kernel's scsi_normalize_sense
(drivers/scsi/scsi_common.c): fields the buffer or ADDITIONAL SENSE LENGTH
does not reach read as zero/None, so an 8-byte fixed sense with additional
length 0 decodes. What is not sense at all (empty, a response code other
than 0x70-0x73, too short to hold the sense key and codes) raises.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import BadMagicError, EncodeError, TruncatedError, ValueRangeError
from protocol.scsi._wire import Buffer, check_bytes, check_uint
from protocol.scsi.constants import AdditionalSense, SenseKey, additional_sense_text
from protocol.scsi.referrals import (
    UserDataSegmentReferral,
    decode_referral_descriptors,
    encode_referral_descriptors,
)

__all__ = ["FieldPointer", "Sense", "encode_sense", "decode_sense", "SENSE_BUFFER_BYTES"]

_CODEC = "sense data"
SENSE_BUFFER_BYTES = 96
"""Largest sense a Linux host keeps (SCSI_SENSE_BUFFERSIZE); also TCMU's sense_buffer size."""

_FIXED_CURRENT, _FIXED_DEFERRED, _DESC_CURRENT, _DESC_DEFERRED = 0x70, 0x71, 0x72, 0x73
_FIXED = struct.Struct(">BBBIBIBBB3s")  # 18 bytes, additional length 10
_FIXED_ADDITIONAL_LENGTH = _FIXED.size - 8
_DESC_INFORMATION = 0x00
_DESC_COMMAND_SPECIFIC = 0x01
_DESC_SENSE_KEY_SPECIFIC = 0x02
_DESC_REFERRAL = 0x0B
_SKSV = 0x80  # SENSE KEY SPECIFIC VALID, bit 7 of the first sense-key-specific byte
_VALID = 0x80  # fixed format byte 0: INFORMATION is valid


@dataclass(frozen=True)
class FieldPointer:
    """Sense-key-specific field pointer (SPC-4 4.5.2.4.2): which CDB/parameter byte was bad."""

    in_cdb: bool
    byte_offset: int
    bit_index: int | None = None

    def to_bytes(self) -> bytes:
        """The 3-byte SENSE KEY SPECIFIC field: SKSV, C/D, BPV, BIT POINTER, FIELD POINTER."""
        check_uint(_CODEC, "FIELD POINTER", self.byte_offset, 16)
        first = _SKSV | (0x40 if self.in_cdb else 0)
        if self.bit_index is not None:
            first |= 0x08 | check_uint(_CODEC, "BIT POINTER", self.bit_index, 3)
        return bytes([first]) + self.byte_offset.to_bytes(2, "big")


@dataclass(frozen=True)
class Sense:
    """Decoded sense data, whatever the format it came in.

    ``sense_key_specific`` is the raw 3-byte field, present only when SKSV is
    set; ``referrals`` only in descriptor format (descriptor type 0x0B), where
    ``not_all_referrals`` is its NOT_ALL_R bit: the device knows more segments
    than it listed.
    """

    key: SenseKey
    asc: int
    ascq: int
    information: int | None = None
    command_specific_information: int | None = None
    sense_key_specific: bytes | None = None
    deferred: bool = False
    descriptor_format: bool = False
    referrals: tuple[UserDataSegmentReferral, ...] | None = None
    not_all_referrals: bool = False

    @classmethod
    def of(cls, key: SenseKey, code: AdditionalSense, *, information: int | None = None,
           field_pointer: FieldPointer | None = None, descriptor_format: bool = False) -> Sense:
        """Build sense from a key and a named ASC/ASCQ, e.g. for an emulator's CHECK CONDITION."""
        return cls(key, code.asc, code.ascq, information=information,
                   sense_key_specific=field_pointer.to_bytes() if field_pointer else None,
                   descriptor_format=descriptor_format)

    @property
    def additional_sense(self) -> AdditionalSense | None:
        """The named ASC/ASCQ, or None if the table does not know it."""
        return AdditionalSense.lookup(self.asc, self.ascq)

    @property
    def field_pointer(self) -> FieldPointer | None:
        """The field pointer, for ILLEGAL REQUEST with SKSV set; else None."""
        sks = self.sense_key_specific
        if self.key != SenseKey.ILLEGAL_REQUEST or sks is None or len(sks) != 3:
            return None
        bit = sks[0] & 0x07 if sks[0] & 0x08 else None
        return FieldPointer(bool(sks[0] & 0x40), int.from_bytes(sks[1:3], "big"), bit)

    def __str__(self) -> str:
        """E.g. ``ILLEGAL REQUEST: INVALID COMMAND OPERATION CODE (20/00)``."""
        text = (f"{SenseKey(self.key).text}: {additional_sense_text(self.asc, self.ascq)}"
                f" ({self.asc:02x}/{self.ascq:02x})")
        if self.information is not None:
            text += f", information 0x{self.information:x}"
        if self.deferred:
            text += " [deferred]"
        return text


def encode_sense(sense: Sense) -> bytes:
    """Sense bytes in the format ``sense.descriptor_format`` names.

    Fixed format is 18 bytes (as the kernel's scsi_build_sense_buffer and
    LIO write it); an INFORMATION value needing more than 32 bits, or
    referrals, can only go in descriptor format.
    """
    key = check_uint(_CODEC, "SENSE KEY", sense.key, 4)
    check_uint(_CODEC, "ASC", sense.asc, 8)
    check_uint(_CODEC, "ASCQ", sense.ascq, 8)
    sks = None
    if sense.sense_key_specific is not None:
        sks = check_bytes(_CODEC, "SENSE KEY SPECIFIC", sense.sense_key_specific, 3)
        if len(sks) != 3 or not sks[0] & _SKSV:
            raise EncodeError(f"{_CODEC}: SENSE KEY SPECIFIC must be 3 bytes with SKSV set")
    if sense.descriptor_format:
        return _encode_descriptor(sense, key, sks)
    if sense.referrals is not None:
        raise EncodeError(f"{_CODEC}: referrals need descriptor format")
    info = sense.information
    if info is not None:
        check_uint(_CODEC, "INFORMATION (fixed format)", info, 32)
    csi = sense.command_specific_information or 0
    check_uint(_CODEC, "COMMAND-SPECIFIC INFORMATION (fixed format)", csi, 32)
    code = _FIXED_DEFERRED if sense.deferred else _FIXED_CURRENT
    return _FIXED.pack(
        code | (_VALID if info is not None else 0), 0, key, info or 0,
        _FIXED_ADDITIONAL_LENGTH, csi, sense.asc, sense.ascq, 0, sks or bytes(3),
    )


def _encode_descriptor(sense: Sense, key: int, sks: bytes | None) -> bytes:
    body = bytearray()
    if sense.information is not None:
        check_uint(_CODEC, "INFORMATION", sense.information, 64)
        body += struct.pack(">BBBxQ", _DESC_INFORMATION, 0x0A, _VALID, sense.information)
    if sense.command_specific_information is not None:
        check_uint(_CODEC, "COMMAND-SPECIFIC INFORMATION", sense.command_specific_information, 64)
        body += struct.pack(">BBxxQ", _DESC_COMMAND_SPECIFIC, 0x0A,
                            sense.command_specific_information)
    if sks is not None:
        body += struct.pack(">BBxx3sx", _DESC_SENSE_KEY_SPECIFIC, 0x06, sks)
    if sense.referrals is not None:
        referrals = encode_referral_descriptors(sense.referrals, _CODEC)
        if len(referrals) + 2 > 0xFF:
            raise EncodeError(f"{_CODEC}: referral descriptor too long ({len(referrals)} bytes)")
        flags = 0x01 if sense.not_all_referrals else 0  # NOT_ALL_R, byte 2 bit 0
        body += bytes([_DESC_REFERRAL, len(referrals) + 2, flags, 0]) + referrals
    if len(body) > 0xFF:
        raise EncodeError(f"{_CODEC}: {len(body)} bytes of descriptors exceed 255")
    code = _DESC_DEFERRED if sense.deferred else _DESC_CURRENT
    return bytes([code, key, sense.asc, sense.ascq, 0, 0, 0, len(body)]) + body


def decode_sense(data: Buffer) -> Sense:
    """Decode fixed or descriptor sense; tolerant of short buffers, strict about non-sense."""
    raw = bytes(data)
    if not raw:
        raise TruncatedError(_CODEC, "RESPONSE CODE", 1, 0)
    code = raw[0] & 0x7F
    if code in (_FIXED_CURRENT, _FIXED_DEFERRED):
        return _decode_fixed(raw, deferred=code == _FIXED_DEFERRED)
    if code in (_DESC_CURRENT, _DESC_DEFERRED):
        return _decode_descriptor(raw, deferred=code == _DESC_DEFERRED)
    raise BadMagicError(_CODEC, "RESPONSE CODE", "0x70-0x73", hex(code))


def _decode_fixed(raw: bytes, *, deferred: bool) -> Sense:
    if len(raw) < 3:
        raise TruncatedError(_CODEC, "SENSE KEY (fixed format)", 3, len(raw))
    key = SenseKey(raw[2] & 0x0F)
    information = None
    if raw[0] & _VALID and len(raw) >= 7:
        information = int.from_bytes(raw[3:7], "big")
    # As scsi_normalize_sense: only what ADDITIONAL SENSE LENGTH covers counts.
    end = min(len(raw), 8 + raw[7]) if len(raw) >= 8 else len(raw)
    asc = raw[12] if end > 12 else 0
    ascq = raw[13] if end > 13 else 0
    csi = int.from_bytes(raw[8:12], "big") if end >= 12 else 0
    sks = raw[15:18] if end >= 18 and raw[15] & _SKSV else None
    return Sense(key, asc, ascq, information=information,
                 command_specific_information=csi or None, sense_key_specific=sks,
                 deferred=deferred)


def _decode_descriptor(raw: bytes, *, deferred: bool) -> Sense:
    if len(raw) < 4:
        raise TruncatedError(_CODEC, "SENSE KEY/ASC/ASCQ (descriptor format)", 4, len(raw))
    key, asc, ascq = SenseKey(raw[1] & 0x0F), raw[2], raw[3]
    end = min(len(raw), 8 + raw[7]) if len(raw) >= 8 else len(raw)
    information = csi = sks = referrals = None
    not_all_referrals = False
    offset = 8
    # A descriptor the buffer cuts off is dropped, as sg3_utils' sg_scsi_sense_desc_find does.
    while offset + 2 <= end:
        desc_type, length = raw[offset], raw[offset + 1]
        desc = raw[offset + 2:offset + 2 + length]
        if len(desc) < length:
            break
        field = f"descriptor {desc_type:#04x} ADDITIONAL LENGTH"
        if desc_type == _DESC_INFORMATION:
            if length != 0x0A:
                raise ValueRangeError(_CODEC, field, 0x0A, length)
            if desc[0] & _VALID:
                information = int.from_bytes(desc[2:10], "big")
        elif desc_type == _DESC_COMMAND_SPECIFIC:
            if length != 0x0A:
                raise ValueRangeError(_CODEC, field, 0x0A, length)
            csi = int.from_bytes(desc[2:10], "big")
        elif desc_type == _DESC_SENSE_KEY_SPECIFIC:
            if length != 0x06:
                raise ValueRangeError(_CODEC, field, 0x06, length)
            if desc[2] & _SKSV:
                sks = desc[2:5]
        elif desc_type == _DESC_REFERRAL:
            if length < 2:
                raise ValueRangeError(_CODEC, field, ">= 2", length)
            not_all_referrals = bool(desc[0] & 0x01)
            referrals = decode_referral_descriptors(desc[2:], f"{_CODEC} referral descriptor")
        offset += 2 + length
    return Sense(key, asc, ascq, information=information, command_specific_information=csi,
                 sense_key_specific=sks, deferred=deferred, descriptor_format=True,
                 referrals=referrals, not_all_referrals=not_all_referrals)
