"""Every SCSI decoder and CDB parser, fed arbitrary bytes, raises nothing but DecodeError."""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol.scsi as scsi
from protocol.errors import DecodeError
from tests.unit.test_scsi_data import SDEB_MODES, lio_report_referrals, LIO_MAPS
from tests.unit.test_scsi_vpd import SCSI_DEBUG_INQUIRY, SDEB_83, SDEB_B0, lio_page_83


def _deep_device_identification(data: bytes) -> object:
    """Decode VPD 0x83 and exercise every typed view, as the agent would."""
    page = scsi.decode_device_identification_vpd(data)
    page.logical_unit_naa()
    page.relative_target_port_id()
    page.target_port_group_id()
    for d in page.designators:
        for view in ("naa", "t10_vendor_id", "relative_target_port_id", "target_port_group_id",
                     "logical_unit_group_id", "scsi_name"):
            try:
                getattr(d, view)
            except DecodeError:
                pass
    return page


def _deep_mode(decode: Callable[[bytes], scsi.ModeParameters]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        params = decode(data)
        for page in params.pages:
            for view in (scsi.decode_caching_mode_page, scsi.decode_control_mode_page):
                try:
                    view(page)
                except DecodeError:
                    pass
        return params
    return run


def _deep_sense(data: bytes) -> object:
    sense = scsi.decode_sense(data)
    str(sense)
    sense.field_pointer  # noqa: B018
    sense.additional_sense  # noqa: B018
    return sense


DECODERS: list[Callable[[bytes], Any]] = [
    _deep_sense,
    scsi.decode_standard_inquiry,
    scsi.decode_vpd_page,
    lambda d: scsi.decode_vpd_page(d, 0xC0),
    scsi.decode_supported_vpd_pages,
    scsi.decode_unit_serial_number_vpd,
    _deep_device_identification,
    scsi.decode_block_limits_vpd,
    scsi.decode_referrals_vpd,
    scsi.decode_read_capacity_10,
    scsi.decode_read_capacity_16,
    _deep_mode(scsi.decode_mode_sense_6),
    _deep_mode(scsi.decode_mode_sense_10),
    scsi.decode_report_referrals,
    scsi.decode_referral_descriptors,
    scsi.decode_report_target_port_groups,
    scsi.parse_inquiry_cdb,
    scsi.parse_test_unit_ready_cdb,
    scsi.parse_read_capacity_10_cdb,
    scsi.parse_read_capacity_16_cdb,
    scsi.parse_report_referrals_cdb,
    scsi.parse_read_write_cdb,
    scsi.parse_synchronize_cache_10_cdb,
    scsi.parse_synchronize_cache_16_cdb,
    scsi.parse_request_sense_cdb,
    scsi.parse_start_stop_unit_cdb,
    scsi.parse_mode_sense_6_cdb,
    scsi.parse_mode_sense_10_cdb,
    scsi.parse_report_target_port_groups_cdb,
]

# Valid samples to mutate: random bytes rarely get past a page code or length check.
SEEDS = [
    SCSI_DEBUG_INQUIRY, SDEB_83, SDEB_B0, lio_page_83(), SDEB_MODES,
    lio_report_referrals(LIO_MAPS),
    bytes.fromhex("700005000000000a00000000200000000000"),
    bytes.fromhex("72000000000000" "1c" "0b1a0100" "00000001" + "00" * 16 + "02001234"),
    bytes.fromhex("00000010" "80cf0001" "00020002" "00000001" "00000002"),
    bytes.fromhex("00b3000c" "00000000" "11223344" "00001000"),
    scsi.encode_read_capacity_16(scsi.ReadCapacity16Data(returned_lba=9, block_length_bytes=512)),
    scsi.build_report_referrals_cdb(5, 4096),
    scsi.build_mode_sense_10_cdb(0x3F, 0xFF),
    scsi.build_read_16_cdb(1, 2),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes overwritten, then cut or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


def _only_decode_errors(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except DecodeError:
            pass


_FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    _only_decode_errors(data)


@_FUZZ
@given(mutated())
def test_mutated_samples_raise_only_decode_errors(data: bytes) -> None:
    _only_decode_errors(data)


def test_every_decoder_is_fuzzed() -> None:
    """A new decode_/parse_ function must be added to DECODERS."""
    names = {n for n in scsi.__all__ if n.startswith(("decode_", "parse_"))}
    # These take decoded objects or are covered through a deep wrapper above.
    indirect = {"decode_caching_mode_page", "decode_control_mode_page", "decode_sense",
                "decode_device_identification_vpd", "decode_mode_sense_6",
                "decode_mode_sense_10"}
    direct = {getattr(f, "__name__", "") for f in DECODERS}
    assert names - indirect <= direct, names - indirect - direct
