"""A LIO-like LUN that answers the way target_core_alua.c/target_core_spc.c do for referrals.

One fileio LUN exported through one port per target port group: INQUIRY
(vendor LIO-ORG, TPGS implicit), VPD 0x00/0x83/0xB3, READ CAPACITY(16),
REPORT TARGET PORT GROUPS and REPORT REFERRALS. REPORT REFERRALS answers
like LIO's target_emulate_report_referrals: every segment as configured,
whatever the CDB's LBA and ONE_SEG say. Nothing here knows the vendor
GET PAGE MAP: that opcode is refused, as LIO refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from agent.kernel.sgio import ScsiCommandError
from agent.topology import MpathMap, NewPath
from protocol import scsi
from tests.unit.fakes_kernel import FakeDeviceMapper

CHECK_CONDITION = 0x02
WWID = "36001405fa4e5b0c1b2d4e6f80a1b2c3d"


def segment(first: int, last: int, optimized: int | None, groups: tuple[int, ...]) -> scsi.UserDataSegmentReferral:
    """A segment listing every group, `optimized` as active/optimized and the rest non-optimized."""
    return scsi.UserDataSegmentReferral(first, last, tuple(
        scsi.ReferralTargetPortGroup(scsi.AluaState.ACTIVE_OPTIMIZED if g == optimized
                                     else scsi.AluaState.ACTIVE_NON_OPTIMIZED, g) for g in groups))


@dataclass
class FakeLioLun:
    capacity_blocks: int
    segments: list
    groups: tuple[int, ...]
    """Target port group id of each port; relative target port k+1 is in groups[k]."""
    block_bytes: int = 512
    segment_size: int = 0
    segment_multiplier: int = 0
    tpg_designator: bool = True
    """False: VPD 0x83 names only the relative port, as some targets do; RTPG maps it."""
    vendor: str = "LIO-ORG"
    product: str = "FILEIO"
    commands: list = field(default_factory=list)

    def handle(self, port: int, cdb: bytes) -> bytes:
        self.commands.append((port, cdb[0]))
        op = cdb[0]
        if op == scsi.Opcode.INQUIRY:
            request = scsi.parse_inquiry_cdb(cdb)
            return self._inquiry(port, request)[: request.allocation_length_bytes]
        if op == scsi.Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == scsi.ServiceActionIn16.READ_CAPACITY_16:
            return scsi.encode_read_capacity_16(scsi.ReadCapacity16Data(
                returned_lba=self.capacity_blocks - 1, block_length_bytes=self.block_bytes))
        if op == scsi.Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == scsi.ServiceActionIn16.REPORT_REFERRALS:
            request = scsi.parse_report_referrals_cdb(cdb)
            if not self.segments:
                raise LookupError("invalid command operation code")  # LIO: empty lba_map
            data = scsi.encode_report_referrals(scsi.ReportReferralsData(tuple(self.segments)))
            return data[: request.allocation_length_bytes]
        if op == scsi.Opcode.MAINTENANCE_IN:
            request = scsi.parse_report_target_port_groups_cdb(cdb)
            data = scsi.encode_report_target_port_groups(scsi.ReportTargetPortGroupsData(tuple(
                scsi.TargetPortGroupDescriptor(target_port_group_id=g,
                                               asymmetric_access_state=scsi.AluaState.ACTIVE_OPTIMIZED,
                                               relative_target_port_ids=(k + 1,))
                for k, g in enumerate(self.groups))))
            return data[: request.allocation_length_bytes]
        if op == scsi.Opcode.TEST_UNIT_READY:
            return b""
        raise LookupError(f"invalid command operation code {op:#x}")

    def _inquiry(self, port: int, request) -> bytes:
        if not request.evpd:
            return scsi.encode_standard_inquiry(scsi.StandardInquiry(
                vendor=self.vendor, product=self.product, revision="4.0", tpgs=scsi.Tpgs.IMPLICIT))
        if request.page_code == 0x00:
            return scsi.encode_supported_vpd_pages(scsi.SupportedVpdPages((0x00, 0x80, 0x83, 0x86, 0xB0, 0xB3)))
        if request.page_code == 0x83:
            designators = [scsi.naa_designator(scsi.NaaIdentifier.from_bytes(bytes.fromhex(WWID[1:]))),
                           scsi.relative_target_port_designator(port)]
            if self.tpg_designator:
                designators.append(scsi.target_port_group_designator(self.groups[port - 1]))
            return scsi.encode_device_identification_vpd(scsi.DeviceIdentificationVpd(tuple(designators)))
        if request.page_code == 0x86:  # R_SUP (byte 8 bit 4) while an lba_map exists, as LIO
            return scsi.encode_vpd_page(0x86, bytes([0, 0x07, 0, 0, 0x10 if self.segments else 0]).ljust(60, b"\0"))
        if request.page_code == 0xB3:
            return scsi.encode_referrals_vpd(scsi.ReferralsVpd(self.segment_size, self.segment_multiplier))
        raise LookupError(f"invalid field in cdb: VPD page {request.page_code:#x}")


class FakeLioPath:
    """One sd path through one LIO port, shaped like agent.kernel.sgio.ScsiDevice."""

    def __init__(self, lun: FakeLioLun, port: int, name: str) -> None:
        self.lun, self.port, self.name = lun, port, name

    async def max_transfer_bytes(self) -> int:
        return 256 * 1024

    def blocking(self):
        """As ScsiDevice.blocking(): execute() never leaves this thread anyway."""
        return self

    async def execute(self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None):
        try:
            data = self.lun.handle(self.port, cdb)
        except LookupError:
            raise ScsiCommandError(self.name, cdb[0], CHECK_CONDITION, 0, 0, None, cdb=cdb) from None
        return SimpleNamespace(data_in=bytes(data)[:data_in_length])


class FakeLioSystem:
    """The LIO LUN behind multipathd's map, one path per port, over FakeDeviceMapper."""

    def __init__(self, lun: FakeLioLun) -> None:
        self.lun = lun
        self.dm = FakeDeviceMapper()
        self.wwid = WWID
        self.paths = {f"sd{chr(ord('b') + k)}": FakeLioPath(lun, k + 1, f"sd{chr(ord('b') + k)}")
                      for k in range(len(lun.groups))}
        self.devs = {name: f"8:{16 * (k + 1)}" for k, name in enumerate(self.paths)}
        self.dm.add_foreign(self.wwid, f"mpath-{self.wwid}", 0)

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        size = self.lun.capacity_blocks * self.lun.block_bytes // 512
        return [MpathMap(self.wwid, self.wwid, "dm-0", size, tuple((n, self.devs[n]) for n in self.paths))]

    def open_path(self, device: str) -> FakeLioPath:
        return self.paths[device]

    async def path_identities(self, devices: list[str]) -> dict[str, str]:
        """Every path on the session it was made with."""
        return {d: f"session-{d}" for d in devices if d in self.paths}

    async def block_devices_of_scsi(self, scsi_sys_path: str) -> list[str]:
        return []

    async def rescan_path(self, device: str) -> None:
        return None

    async def describe_path(self, device: str, luns=None) -> NewPath | None:
        """As the kernel describes one of the LUN's disks (all of them are in multipathd's map here)."""
        if device not in self.paths or (luns is not None and self.wwid not in luns):
            return None
        size = self.lun.capacity_blocks * self.lun.block_bytes // 512
        return NewPath(device, self.devs[device], self.wwid, size)

    def group_of_dev(self, dev: str) -> int:
        name = next(n for n, d in self.devs.items() if d == dev)
        return self.lun.groups[self.paths[name].port - 1]
