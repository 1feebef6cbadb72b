"""The emulated array's logical unit, free of any transport: handle(member, cdb, data_out) -> result.

Every member answers for the same logical unit (same vendor, product,
serial, NAA designator, data) and adds its own identity (VPD 0xC0, and VPD
0x83's relative target port and target port group). Reads and writes are
counted per member and per page portion as direct (the member owns the
page) or forwarded (another member does). After a change each member's
next command, except INQUIRY, REPORT LUNS and REQUEST SENSE (SAM-5 5.14),
gets the pending unit attention once.

Codecs come from protocol/scsi (CDBs, INQUIRY/VPD, capacity, mode, sense)
and protocol/pagemap.py (GET PAGE MAP, VPD 0xC0), protocol/portals.py (VPD 0xC1,
every member's portals, unless built with member_portals=False: a
protocol-1.0 array).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from protocol import pagemap, pagemap_changes, portals, scsi
from protocol.errors import DecodeError
from protocol.pagemap_changes import ChangesStatus as Status
from protocol.scsi import AdditionalSense as Asc
from protocol.scsi import Opcode, ScsiStatus, SenseKey
from tests.array import faults
from tests.array.store import SparseStore
from tests.array.volume import BLOCK_BYTES, ArrayVolume

VENDOR = "SWAGENT"
PRODUCT = "PAGEMAP ARRAY"
REVISION = "0001"
# SPC-4 table 140: SAM-5, SPC-4, SBC-3, iSCSI (no version claimed). libiscsi's
# Inquiry.BlockLimits checks SBC-3 here before it trusts VPD 0xB0.
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0, 0x0960)
MAX_TRANSFER_BLOCKS = 2048
"""1 MiB, the hw_max_sectors tests/array/lio.py gives each backstore."""
# IEEE company id with the X (locally administered) bit set and "SA": the
# project's own, not any vendor's registered OUI.
NAA_COMPANY_ID = 0x025341

# Commands that neither report nor clear a unit attention (SAM-5 5.14).
_UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})
_DATA_OUT = frozenset({Opcode.WRITE_10, Opcode.WRITE_16})
# Sense for a WRITE whose data-out length disagrees with its CDB, as LIO
# answers (target_cmd_size_check): INVALID FIELD IN COMMAND INFORMATION UNIT.
_INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)


@dataclass(frozen=True)
class ScsiResult:
    """A command's outcome: status, data-in (empty when none) and sense (with CHECK CONDITION)."""

    status: int
    data_in: bytes | memoryview = b""
    sense: bytes = b""


class CheckCondition(Exception):
    """Raised inside a command handler to answer CHECK CONDITION with this sense."""

    def __init__(self, key: SenseKey, asc_ascq: tuple[int, int] | Asc) -> None:
        super().__init__(key, asc_ascq)
        self.key = key
        self.asc, self.ascq = asc_ascq.value if isinstance(asc_ascq, Asc) else asc_ascq

    def sense(self) -> bytes:
        """Fixed-format sense bytes (the control page says D_SENSE=0)."""
        return scsi.encode_sense(scsi.Sense(self.key, self.asc, self.ascq))


def _illegal(asc: Asc | tuple[int, int] = Asc.INVALID_FIELD_IN_CDB) -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, asc)


@dataclass(frozen=True)
class LuIdentity:
    """What every member reports for the logical unit: unit serial and NAA designator."""

    serial: str
    naa: scsi.NaaIdentifier

    @classmethod
    def for_volume(cls, name: str) -> LuIdentity:
        """A stable identity derived from the volume name (same name, same WWID)."""
        digest = hashlib.sha256(f"switch-agent emulated volume {name}".encode()).digest()
        serial = "SWA" + digest[:8].hex().upper()
        naa = scsi.NaaIdentifier(6, NAA_COMPANY_ID, int.from_bytes(digest[8:13], "big") >> 4,
                                 int.from_bytes(digest[13:21], "big"))
        return cls(serial, naa)

    @property
    def wwid(self) -> str:
        """The WWID udev and multipathd derive from the NAA designator."""
        return self.naa.wwid


class LogicalUnit:
    """Answers SCSI commands arriving at any member, against one volume and one store."""

    def __init__(self, volume: ArrayVolume, store: SparseStore, identity: LuIdentity, *,
                 member_portals: bool = True) -> None:
        self.volume = volume
        self.member_portals = member_portals
        self.store = store
        self.identity = identity
        self._handlers: dict[int, Callable[[int, bytes, bytes | memoryview], bytes | memoryview]] = {
            Opcode.TEST_UNIT_READY: self._test_unit_ready,
            Opcode.REQUEST_SENSE: self._request_sense,
            Opcode.INQUIRY: self._inquiry,
            Opcode.MODE_SENSE_6: self._mode_sense,
            Opcode.MODE_SENSE_10: self._mode_sense,
            Opcode.START_STOP_UNIT: self._start_stop_unit,
            Opcode.READ_CAPACITY_10: self._read_capacity_10,
            Opcode.SERVICE_ACTION_IN_16: self._service_action_in_16,
            Opcode.READ_10: self._read_write,
            Opcode.WRITE_10: self._read_write,
            Opcode.READ_16: self._read_write,
            Opcode.WRITE_16: self._read_write,
            Opcode.SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            Opcode.SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            pagemap.GET_PAGE_MAP_OPCODE: self._get_page_map,
        }

    @staticmethod
    def wants_data_out(cdb: bytes) -> bool:
        """True for commands whose data-out the transport must gather (writes)."""
        return bool(cdb) and cdb[0] in _DATA_OUT

    def handle(self, member: int, cdb: bytes, data_out: bytes | memoryview = b"") -> ScsiResult:
        """Execute `cdb` as received by member number `member`."""
        if not cdb:
            return _check(_illegal(Asc.INVALID_COMMAND_OPERATION_CODE))
        opcode = cdb[0]
        try:
            if opcode not in _UA_EXEMPT:
                pending = self.volume.take_unit_attention(member)
                if pending is not None:
                    raise CheckCondition(SenseKey.UNIT_ATTENTION, pending)
            handler = self._handlers.get(opcode)
            if handler is None:
                raise _illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
            return ScsiResult(ScsiStatus.GOOD, handler(member, cdb, data_out))
        except CheckCondition as condition:
            return _check(condition)
        except DecodeError:
            # A parser refused a field (reserved bits, bad combination, short CDB).
            return _check(_illegal())

    # -- no-data commands ------------------------------------------------------------

    def _test_unit_ready(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        scsi.parse_test_unit_ready_cdb(cdb)
        return b""

    def _start_stop_unit(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        # Always spinning: accept START/STOP as a no-op, like LIO's sbc_emulate_startstop.
        scsi.parse_start_stop_unit_cdb(cdb)
        return b""

    def _request_sense(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        request = scsi.parse_request_sense_cdb(cdb)
        pending = self.volume.take_unit_attention(member)
        if pending is not None:
            sense = scsi.Sense(SenseKey.UNIT_ATTENTION, *pending, descriptor_format=request.descriptor_format)
        else:
            sense = scsi.Sense.of(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE_INFORMATION,
                                  descriptor_format=request.descriptor_format)
        return scsi.encode_sense(sense)[: request.allocation_length_bytes]

    # -- INQUIRY ---------------------------------------------------------------------

    def _inquiry(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        request = scsi.parse_inquiry_cdb(cdb)
        if not request.evpd:
            data = scsi.encode_standard_inquiry(scsi.StandardInquiry(
                vendor=VENDOR, product=PRODUCT, revision=REVISION, hisup=True, multi_port=True,
                version_descriptors=VERSION_DESCRIPTORS))
        else:
            page = self._vpd_pages(member).get(request.page_code)
            if page is None:
                raise _illegal()
            data = page()
        return data[: request.allocation_length_bytes]

    def _vpd_pages(self, member: int) -> dict[int, Callable[[], bytes]]:
        state = self.volume.member(member)
        pages: dict[int, Callable[[], bytes]] = {}
        pages[0x00] = lambda: scsi.encode_supported_vpd_pages(scsi.SupportedVpdPages(tuple(sorted(pages))))
        pages[0x80] = lambda: scsi.encode_unit_serial_number_vpd(
            scsi.UnitSerialNumberVpd(self.identity.serial))
        pages[0x83] = lambda: scsi.encode_device_identification_vpd(scsi.DeviceIdentificationVpd((
            scsi.naa_designator(self.identity.naa),
            scsi.relative_target_port_designator(state.relative_port),
            scsi.target_port_group_designator(state.member_id),
        )))
        pages[0xB0] = lambda: scsi.encode_block_limits_vpd(scsi.BlockLimitsVpd(
            maximum_transfer_length_blocks=MAX_TRANSFER_BLOCKS))
        # Block device characteristics (SBC-3 6.5.2): MEDIUM ROTATION RATE 1 =
        # non-rotating, the rest 0. TODO(protocol/scsi): no 0xB1 encoder yet; the
        # 60-byte payload is built here on the generic VPD header encoder.
        pages[0xB1] = lambda: scsi.encode_vpd_page(0xB1, (1).to_bytes(2, "big").ljust(60, b"\0"))
        pages[pagemap.MEMBER_IDENTITY_VPD] = lambda: pagemap.encode_member_identity_vpd(
            pagemap.MemberIdentity(state.member_id, self.volume.generation, state.name,
                                   pagemap_changes.FEATURE_CHANGES_SINCE if self.volume.answers_changes else 0))
        if self.member_portals:
            pages[portals.MEMBER_PORTALS_VPD] = lambda: portals.encode_member_portals_vpd(
                self.volume.member_portals())
        return pages

    # -- capacity and mode pages ---------------------------------------------------

    def _read_capacity_10(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        scsi.parse_read_capacity_10_cdb(cdb)
        last = min(self.volume.total_blocks - 1, 0xFFFFFFFF)
        return scsi.encode_read_capacity_10(scsi.ReadCapacity10Data(last, BLOCK_BYTES))

    def _service_action_in_16(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        if len(cdb) < 2 or cdb[1] & 0x1F != scsi.ServiceActionIn16.READ_CAPACITY_16:
            raise _illegal()  # REPORT REFERRALS and the rest: not offered
        request = scsi.parse_read_capacity_16_cdb(cdb)
        data = scsi.encode_read_capacity_16(scsi.ReadCapacity16Data(
            returned_lba=self.volume.total_blocks - 1, block_length_bytes=BLOCK_BYTES))
        return data[: request.allocation_length_bytes]

    def _mode_sense(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        ten = cdb[0] == Opcode.MODE_SENSE_10
        request = scsi.parse_mode_sense_10_cdb(cdb) if ten else scsi.parse_mode_sense_6_cdb(cdb)
        if request.page_control == scsi.PageControl.SAVED:
            raise _illegal(_SAVING_PARAMETERS_NOT_SUPPORTED)
        changeable = request.page_control == scsi.PageControl.CHANGEABLE
        caching = scsi.encode_caching_mode_page(scsi.CachingModePage(write_cache_enabled=not changeable))
        control = scsi.encode_control_mode_page(scsi.ControlModePage())
        if changeable:  # nothing is changeable: all-zero masks of the same length
            control = scsi.ModePage(control.page_code, bytes(len(control.data)))
        available = {scsi.ModePageCode.CACHING: caching, scsi.ModePageCode.CONTROL: control}
        if request.subpage_code not in (0, 0xFF):
            raise _illegal()
        if request.page_code == scsi.ModePageCode.ALL_PAGES:
            pages = tuple(available[code] for code in sorted(available))
        elif request.page_code in available:
            pages = (available[request.page_code],)
        else:
            raise _illegal()
        descriptors = ()
        long_lba = False
        if not request.disable_block_descriptors:
            blocks = self.volume.total_blocks
            long_lba = ten and request.long_lba_accepted and blocks > 0xFFFFFFFF
            count = blocks if long_lba else min(blocks, 0xFFFFFFFF)
            descriptors = (scsi.BlockDescriptor(count, BLOCK_BYTES),)
        # DPOFUA: FUA writes are honoured (fdatasync), DPO is a hint we may ignore.
        params = scsi.ModeParameters(pages=pages, block_descriptors=descriptors, long_lba=long_lba,
                                     device_specific_parameter=scsi.DPOFUA)
        data = scsi.encode_mode_sense_10(params) if ten else scsi.encode_mode_sense_6(params)
        return data[: request.allocation_length_bytes]

    # -- data ------------------------------------------------------------------------

    def _read_write(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        request = scsi.parse_read_write_cdb(cdb)
        # RDPROTECT/WRPROTECT (byte 1 bits 7-5) must be 0 without protection
        # information (SBC-3 5.11). TODO(protocol/scsi): ReadWriteCdb does not carry the field yet.
        if cdb[1] & 0xE0:
            raise _illegal()
        self._check_lba_range(request.lba, request.transfer_length_blocks)
        offset = request.lba * BLOCK_BYTES
        length = request.transfer_length_blocks * BLOCK_BYTES
        if request.is_write:
            if len(data_out) != length:
                raise _illegal(_INVALID_FIELD_IN_COMMAND_IU)
            self.store.write(offset, data_out)
            if request.fua:
                self.store.flush()
            self.volume.account(member, offset, length, write=True)
            return b""
        data = self.store.read(offset, length)
        self.volume.account(member, offset, length)
        return data

    def _synchronize_cache(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        if cdb[0] == Opcode.SYNCHRONIZE_CACHE_10:
            request = scsi.parse_synchronize_cache_10_cdb(cdb)
        else:
            request = scsi.parse_synchronize_cache_16_cdb(cdb)
        self._check_lba_range(request.lba, request.block_count)
        self.store.flush()
        return b""

    def _check_lba_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.volume.total_blocks:
            raise _illegal(Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)

    # -- the page map ----------------------------------------------------------------

    def _get_page_map(self, member: int, cdb: bytes, data_out: bytes | memoryview) -> bytes:
        if pagemap_changes.is_changes_since_cdb(cdb) and self.volume.answers_changes:
            return self._changes_since(cdb)
        request = pagemap.parse_get_page_map_cdb(cdb)
        volume = self.volume
        if request.start_page > volume.total_pages:
            raise _illegal()
        has_entries = (request.allocation_length > pagemap.HEADER_FIXED_BYTES
                       and request.start_page < volume.total_pages)
        kind = volume.take_corruption(has_entries=has_entries)
        if kind == "generation-churn":
            volume.bump_generation()
        response = pagemap.encode_page_map_response(
            volume.owners, generation=volume.generation, page_size_sectors=volume.page_size_sectors,
            members=volume.page_map_members(), start_page=request.start_page,
            allocation_length=request.allocation_length)
        if kind is not None and kind != "generation-churn":
            response = faults.corrupt(response, kind)
        return response


    def _changes_since(self, cdb: bytes) -> bytes:
        """GET PAGE MAP's changes-since form: as many whole generations as fit, merged."""
        request = pagemap_changes.parse_changes_since_cdb(cdb)
        volume = self.volume
        kind = volume.take_corruption(has_entries=request.allocation_length > pagemap.HEADER_FIXED_BYTES)
        if kind == "generation-churn":
            volume.bump_generation()
        members = volume.page_map_members()
        common = dict(current_generation=volume.generation, total_pages=volume.total_pages,
                      page_size_sectors=volume.page_size_sectors, members=members,
                      allocation_length=request.allocation_length)
        found = volume.changes.since(request.since_key)
        if isinstance(found, str):
            status = Status.RESHAPED if found == "reshaped" else Status.TOO_OLD
            response = pagemap_changes.encode_changes_response(status=status, **common)
        else:
            since, steps = found
            response = pagemap_changes.encode_changes_response(status=Status.TOO_LARGE, **common)
            for count in range(len(steps), -1, -1):
                if count == 0 and steps:
                    break  # not even the first generation fits
                pages, owners = _merged(steps[:count])
                runs = pagemap_changes.runs_of(pages, owners)[0].size
                if pagemap_changes.response_length(len(members), runs) <= request.allocation_length:
                    response = pagemap_changes.encode_changes_response(
                        status=Status.CHANGES, from_generation=since,
                        to_generation=steps[count - 1][0] if count else since, pages=pages, owners=owners,
                        **common)
                    break
        if kind is not None and kind != "generation-churn":
            response = faults.corrupt(response, kind)
        return response


def _merged(steps: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The pages the steps changed, ascending, each with the owner the last step gave it."""
    if not steps:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pages = np.concatenate([p for _, p, _ in steps])[::-1]
    owners = np.concatenate([o for _, _, o in steps])[::-1]
    unique, last = np.unique(pages, return_index=True)
    return unique, owners[last]


def _check(condition: CheckCondition) -> ScsiResult:
    return ScsiResult(ScsiStatus.CHECK_CONDITION, b"", condition.sense())
