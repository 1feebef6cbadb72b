"""MODE SENSE(6)/(10) parameter data, and the caching and control mode pages.

Mode parameter header (SPC-4 7.5.5):
  (6)  0 MODE DATA LENGTH (n - 1), 1 MEDIUM TYPE, 2 DEVICE-SPECIFIC PARAMETER,
       3 BLOCK DESCRIPTOR LENGTH
  (10) 0-1 MODE DATA LENGTH (n - 2), 2 MEDIUM TYPE, 3 DEVICE-SPECIFIC PARAMETER,
       4 LONGLBA (bit 0), 5 reserved, 6-7 BLOCK DESCRIPTOR LENGTH
then block descriptors (SBC-3 6.4.2: short = 0-3 NUMBER OF LOGICAL BLOCKS,
4 reserved, 5-7 LOGICAL BLOCK LENGTH; long = 0-7 blocks, 8-11 reserved,
12-15 length), then mode pages: page_0 format (0 PS|SPF=0|PAGE CODE,
1 PAGE LENGTH) or sub_page format (0 PS|SPF=1|PAGE CODE, 1 SUBPAGE CODE,
2-3 PAGE LENGTH). DEVICE-SPECIFIC PARAMETER for SBC: WP bit 7, DPOFUA bit 4.
LIO's spc_emulate_modesense builds the same layout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import BadMagicError, EncodeError, ValueRangeError
from protocol.scsi._wire import Buffer, check_bytes, check_uint, need
from protocol.scsi.constants import ModePageCode

__all__ = [
    "ModePage", "BlockDescriptor", "ModeParameters",
    "encode_mode_sense_6", "decode_mode_sense_6", "encode_mode_sense_10", "decode_mode_sense_10",
    "CachingModePage", "encode_caching_mode_page", "decode_caching_mode_page",
    "ControlModePage", "encode_control_mode_page", "decode_control_mode_page",
    "WRITE_PROTECT", "DPOFUA",
]

WRITE_PROTECT = 0x80
"""DEVICE-SPECIFIC PARAMETER bit 7 for direct-access devices (SBC-3 6.4.1)."""
DPOFUA = 0x10
"""DEVICE-SPECIFIC PARAMETER bit 4: DPO and FUA supported (SBC-3 6.4.1)."""

_HEADER6 = struct.Struct(">BBBB")
_HEADER10 = struct.Struct(">HBBBxH")
_SHORT_DESCRIPTOR = struct.Struct(">IxBH")  # blocks, -, length high byte, length low 16 bits
_LONG_DESCRIPTOR = struct.Struct(">Q4xI")
_PS = 0x80
_SPF = 0x40


@dataclass(frozen=True)
class ModePage:
    """One mode page; ``data`` is what follows its header (page_0 or sub_page format)."""

    page_code: int
    data: bytes
    subpage_code: int = 0
    parameters_saveable: bool = False


@dataclass(frozen=True)
class BlockDescriptor:
    """A direct-access block descriptor (short or long LBA form, SBC-3 6.4.2)."""

    block_count: int
    block_length_bytes: int


@dataclass(frozen=True, kw_only=True)
class ModeParameters:
    """MODE SENSE parameter data: header fields, block descriptors and pages."""

    pages: tuple[ModePage, ...] = ()
    block_descriptors: tuple[BlockDescriptor, ...] = ()
    medium_type: int = 0
    device_specific_parameter: int = 0
    long_lba: bool = False

    @property
    def write_protected(self) -> bool:
        """WP bit of the DEVICE-SPECIFIC PARAMETER."""
        return bool(self.device_specific_parameter & WRITE_PROTECT)

    def page(self, page_code: int, subpage_code: int = 0) -> ModePage | None:
        """The first page with this code and subpage, or None."""
        for p in self.pages:
            if p.page_code == page_code and p.subpage_code == subpage_code:
                return p
        return None


def _encode_body(codec: str, params: ModeParameters, *, allow_long: bool) -> tuple[bytes, bytes]:
    """(block descriptors, pages) bytes."""
    if params.long_lba and not allow_long:
        raise EncodeError(f"{codec}: LONGLBA block descriptors need MODE SENSE(10)")
    descriptors = bytearray()
    for i, d in enumerate(params.block_descriptors):
        if params.long_lba:
            check_uint(codec, f"block descriptor {i} NUMBER OF LOGICAL BLOCKS", d.block_count, 64)
            check_uint(codec, f"block descriptor {i} LOGICAL BLOCK LENGTH",
                       d.block_length_bytes, 32)
            descriptors += _LONG_DESCRIPTOR.pack(d.block_count, d.block_length_bytes)
        else:
            check_uint(codec, f"block descriptor {i} NUMBER OF LOGICAL BLOCKS", d.block_count, 32)
            check_uint(codec, f"block descriptor {i} LOGICAL BLOCK LENGTH",
                       d.block_length_bytes, 24)
            descriptors += _SHORT_DESCRIPTOR.pack(d.block_count, d.block_length_bytes >> 16,
                                                  d.block_length_bytes & 0xFFFF)
    pages = bytearray()
    for i, p in enumerate(params.pages):
        check_uint(codec, f"page {i} PAGE CODE", p.page_code, 6)
        check_uint(codec, f"page {i} SUBPAGE CODE", p.subpage_code, 8)
        ps = _PS if p.parameters_saveable else 0
        if p.subpage_code:
            data = check_bytes(codec, f"page {i} data", p.data, 0xFFFF)
            pages += struct.pack(">BBH", ps | _SPF | p.page_code, p.subpage_code, len(data))
        else:
            data = check_bytes(codec, f"page {i} data", p.data, 0xFF)
            pages += struct.pack(">BB", ps | p.page_code, len(data))
        pages += data
    return bytes(descriptors), bytes(pages)


def encode_mode_sense_6(params: ModeParameters) -> bytes:
    """Array side: MODE SENSE(6) data (at most 256 bytes; short block descriptors only)."""
    codec = "MODE SENSE(6) data"
    check_uint(codec, "MEDIUM TYPE", params.medium_type, 8)
    check_uint(codec, "DEVICE-SPECIFIC PARAMETER", params.device_specific_parameter, 8)
    descriptors, pages = _encode_body(codec, params, allow_long=False)
    total = _HEADER6.size + len(descriptors) + len(pages)
    if total - 1 > 0xFF or len(descriptors) > 0xFF:
        raise EncodeError(f"{codec}: {total} bytes do not fit MODE DATA LENGTH (max 256)")
    return _HEADER6.pack(total - 1, params.medium_type, params.device_specific_parameter,
                         len(descriptors)) + descriptors + pages


def encode_mode_sense_10(params: ModeParameters) -> bytes:
    """Array side: MODE SENSE(10) data."""
    codec = "MODE SENSE(10) data"
    check_uint(codec, "MEDIUM TYPE", params.medium_type, 8)
    check_uint(codec, "DEVICE-SPECIFIC PARAMETER", params.device_specific_parameter, 8)
    descriptors, pages = _encode_body(codec, params, allow_long=True)
    total = _HEADER10.size + len(descriptors) + len(pages)
    if total - 2 > 0xFFFF:
        raise EncodeError(f"{codec}: {total} bytes do not fit MODE DATA LENGTH")
    return _HEADER10.pack(total - 2, params.medium_type, params.device_specific_parameter,
                          0x01 if params.long_lba else 0, len(descriptors)) + descriptors + pages


def _decode_body(codec: str, raw: bytes, header_size: int, total: int, descriptor_length: int,
                 long_lba: bool, medium_type: int, device_specific: int) -> ModeParameters:
    need(codec, f"data ({total} bytes per MODE DATA LENGTH)", raw, total)
    if header_size + descriptor_length > total:
        raise ValueRangeError(codec, "BLOCK DESCRIPTOR LENGTH",
                              f"<= {total - header_size}", descriptor_length)
    shape = _LONG_DESCRIPTOR if long_lba else _SHORT_DESCRIPTOR
    if descriptor_length % shape.size:
        raise ValueRangeError(codec, "BLOCK DESCRIPTOR LENGTH", f"a multiple of {shape.size}",
                              descriptor_length)
    descriptors = []
    for offset in range(header_size, header_size + descriptor_length, shape.size):
        if long_lba:
            blocks, length = _LONG_DESCRIPTOR.unpack_from(raw, offset)
        else:
            blocks, high, low = _SHORT_DESCRIPTOR.unpack_from(raw, offset)
            length = (high << 16) | low
        descriptors.append(BlockDescriptor(blocks, length))
    pages: list[ModePage] = []
    offset = header_size + descriptor_length
    while offset < total:
        field = f"page {len(pages)}"
        b0 = raw[offset]
        if b0 & _SPF:
            if offset + 4 > total:
                raise ValueRangeError(codec, f"{field} header", "4 bytes", total - offset)
            subpage, length = struct.unpack_from(">BH", raw, offset + 1)
            start = offset + 4
        else:
            if offset + 2 > total:
                raise ValueRangeError(codec, f"{field} header", "2 bytes", total - offset)
            subpage, length = 0, raw[offset + 1]
            start = offset + 2
        if start + length > total:
            raise ValueRangeError(codec, f"{field} PAGE LENGTH", f"<= {total - start}", length)
        pages.append(ModePage(b0 & 0x3F, raw[start:start + length], subpage, bool(b0 & _PS)))
        offset = start + length
    return ModeParameters(pages=tuple(pages), block_descriptors=tuple(descriptors),
                          medium_type=medium_type, device_specific_parameter=device_specific,
                          long_lba=long_lba)


def decode_mode_sense_6(data: Buffer) -> ModeParameters:
    """Host side: decode MODE SENSE(6) data (TruncatedError if the allocation length cut it)."""
    codec = "MODE SENSE(6) data"
    raw = bytes(data)
    need(codec, "header", raw, _HEADER6.size)
    length, medium, device_specific, descriptor_length = _HEADER6.unpack_from(raw)
    if length + 1 < _HEADER6.size:
        raise ValueRangeError(codec, "MODE DATA LENGTH", f">= {_HEADER6.size - 1}", length)
    return _decode_body(codec, raw, _HEADER6.size, length + 1, descriptor_length, False,
                        medium, device_specific)


def decode_mode_sense_10(data: Buffer) -> ModeParameters:
    """Host side: decode MODE SENSE(10) data (TruncatedError if the allocation length cut it)."""
    codec = "MODE SENSE(10) data"
    raw = bytes(data)
    need(codec, "header", raw, _HEADER10.size)
    length, medium, device_specific, flags, descriptor_length = _HEADER10.unpack_from(raw)
    if length + 2 < _HEADER10.size:
        raise ValueRangeError(codec, "MODE DATA LENGTH", f">= {_HEADER10.size - 2}", length)
    return _decode_body(codec, raw, _HEADER10.size, length + 2, descriptor_length,
                        bool(flags & 0x01), medium, device_specific)


def _check_page(codec: str, page: ModePage, page_code: int, min_length: int) -> bytes:
    if page.page_code != page_code or page.subpage_code != 0:
        raise BadMagicError(codec, "PAGE CODE", f"{page_code:#04x}/00",
                            f"{page.page_code:#04x}/{page.subpage_code:02x}")
    if len(page.data) < min_length:
        raise ValueRangeError(codec, "PAGE LENGTH", f">= {min_length:#04x}", len(page.data))
    return page.data


# -- caching mode page 0x08 (SBC-3 6.4.5) -----------------------------------------

_CACHING_LENGTH = 0x12  # as LIO's spc_modesense_caching


@dataclass(frozen=True, kw_only=True)
class CachingModePage:
    """The caching page's WCE, RCD and DRA bits; other fields encode as 0."""

    write_cache_enabled: bool = False
    read_cache_disabled: bool = False
    disable_read_ahead: bool = False
    parameters_saveable: bool = False


def encode_caching_mode_page(page: CachingModePage) -> ModePage:
    """Caching page (0x08, PAGE LENGTH 0x12): WCE byte 2 bit 2, RCD bit 0, DRA byte 12 bit 5."""
    data = bytearray(_CACHING_LENGTH)
    data[0] = (0x04 if page.write_cache_enabled else 0) | (0x01 if page.read_cache_disabled else 0)
    data[10] = 0x20 if page.disable_read_ahead else 0
    return ModePage(ModePageCode.CACHING, bytes(data),
                    parameters_saveable=page.parameters_saveable)


def decode_caching_mode_page(page: ModePage) -> CachingModePage:
    """Interpret a decoded mode page as the caching page."""
    data = _check_page("caching mode page", page, ModePageCode.CACHING, _CACHING_LENGTH)
    return CachingModePage(write_cache_enabled=bool(data[0] & 0x04),
                           read_cache_disabled=bool(data[0] & 0x01),
                           disable_read_ahead=bool(data[10] & 0x20),
                           parameters_saveable=page.parameters_saveable)


# -- control mode page 0x0A (SPC-4 7.5.8) -----------------------------------------

_CONTROL_LENGTH = 0x0A  # as LIO's spc_modesense_control
_CONTROL = struct.Struct(">BBBBxxHH")


@dataclass(frozen=True, kw_only=True)
class ControlModePage:
    """Control page fields a host or emulator uses; the rest encode as 0."""

    task_set_type: int = 0
    descriptor_sense: bool = False
    global_logging_target_save_disable: bool = False
    queue_algorithm_modifier: int = 0
    queue_error_management: int = 0
    unit_attention_interlocks_control: int = 0
    software_write_protect: bool = False
    task_aborted_status: bool = False
    busy_timeout_period_100ms: int = 0
    extended_self_test_completion_time_seconds: int = 0
    parameters_saveable: bool = False


def encode_control_mode_page(page: ControlModePage) -> ModePage:
    """Control page (0x0A, PAGE LENGTH 0x0A); D_SENSE asks for descriptor-format sense."""
    codec = "control mode page"
    p = page
    check_uint(codec, "TST", p.task_set_type, 3)
    check_uint(codec, "QUEUE ALGORITHM MODIFIER", p.queue_algorithm_modifier, 4)
    check_uint(codec, "QERR", p.queue_error_management, 2)
    check_uint(codec, "UA_INTLCK_CTRL", p.unit_attention_interlocks_control, 2)
    check_uint(codec, "BUSY TIMEOUT PERIOD", p.busy_timeout_period_100ms, 16)
    check_uint(codec, "EXTENDED SELF-TEST COMPLETION TIME",
               p.extended_self_test_completion_time_seconds, 16)
    data = _CONTROL.pack(
        (p.task_set_type << 5) | (0x04 if p.descriptor_sense else 0)
        | (0x02 if p.global_logging_target_save_disable else 0),
        (p.queue_algorithm_modifier << 4) | (p.queue_error_management << 1),
        (p.unit_attention_interlocks_control << 4) | (0x08 if p.software_write_protect else 0),
        0x40 if p.task_aborted_status else 0,
        p.busy_timeout_period_100ms,
        p.extended_self_test_completion_time_seconds,
    )
    return ModePage(ModePageCode.CONTROL, data, parameters_saveable=p.parameters_saveable)


def decode_control_mode_page(page: ModePage) -> ControlModePage:
    """Interpret a decoded mode page as the control page."""
    data = _check_page("control mode page", page, ModePageCode.CONTROL, _CONTROL_LENGTH)
    b2, b3, b4, b5, busy, self_test = _CONTROL.unpack_from(data)
    return ControlModePage(
        task_set_type=b2 >> 5,
        descriptor_sense=bool(b2 & 0x04),
        global_logging_target_save_disable=bool(b2 & 0x02),
        queue_algorithm_modifier=b3 >> 4,
        queue_error_management=(b3 >> 1) & 0x03,
        unit_attention_interlocks_control=(b4 >> 4) & 0x03,
        software_write_protect=bool(b4 & 0x08),
        task_aborted_status=bool(b5 & 0x40),
        busy_timeout_period_100ms=busy,
        extended_self_test_completion_time_seconds=self_test,
        parameters_saveable=page.parameters_saveable,
    )
