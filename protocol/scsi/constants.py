"""SCSI numbers: opcodes, service actions, status, sense keys, ASC/ASCQ, VPD and mode page codes.

Values are from SPC-4/SBC-3 as spelled in the Linux kernel's
include/scsi/scsi_proto.h (opcodes, service actions, SAM_STAT_*, sense keys,
SCSI_ACCESS_STATE_*) and sg3_utils' sg_lib_data.c (ASC/ASCQ text).
"""

from __future__ import annotations

from enum import Enum, IntEnum


class Opcode(IntEnum):
    """Operation codes (byte 0 of a CDB) this project builds or answers."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3


class ServiceActionIn16(IntEnum):
    """Service actions of SERVICE ACTION IN(16), CDB byte 1 bits 4-0 (scsi_proto.h SAI_*)."""

    READ_CAPACITY_16 = 0x10
    REPORT_REFERRALS = 0x13


class MaintenanceIn(IntEnum):
    """Service actions of MAINTENANCE IN, CDB byte 1 bits 4-0 (scsi_proto.h MI_*)."""

    REPORT_TARGET_PORT_GROUPS = 0x0A


def cdb_length_for_opcode(opcode: int) -> int:
    """CDB length implied by the opcode's group code, as the kernel's COMMAND_SIZE does.

    Group (opcode >> 5) -> {6, 10, 10, 12, 16, 12, 10, 10} (include/scsi/scsi_common.h
    scsi_command_size_tbl). Vendor opcodes 0xC0-0xFF therefore count as 10 bytes.
    """
    return (6, 10, 10, 12, 16, 12, 10, 10)[(opcode >> 5) & 7]


class ScsiStatus(IntEnum):
    """SAM status codes (scsi_proto.h SAM_STAT_*)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """Sense keys, SPC-4 table 47 (all 16 values, so any 4-bit key decodes)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    EQUAL = 0xC  # obsolete in SPC-4
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF

    @property
    def text(self) -> str:
        """Upper-case name as sg3_utils prints it, e.g. ``ILLEGAL REQUEST``."""
        return self.name.replace("_", " ")


class AdditionalSense(Enum):
    """ASC/ASCQ pairs this project raises or reacts to; value is ``(asc, ascq)``."""

    NO_ADDITIONAL_SENSE_INFORMATION = (0x00, 0x00)
    LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
    LOGICAL_UNIT_IS_IN_PROCESS_OF_BECOMING_READY = (0x04, 0x01)
    LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION = (0x04, 0x0A)
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE = (0x04, 0x0B)
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE = (0x04, 0x0C)
    LOGICAL_UNIT_COMMUNICATION_FAILURE = (0x08, 0x00)
    WRITE_ERROR = (0x0C, 0x00)
    UNRECOVERED_READ_ERROR = (0x11, 0x00)
    PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
    INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
    LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE = (0x21, 0x00)
    INVALID_FIELD_IN_CDB = (0x24, 0x00)
    LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
    INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
    WRITE_PROTECTED = (0x27, 0x00)
    NOT_READY_TO_READY_CHANGE = (0x28, 0x00)
    POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = (0x29, 0x00)
    I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
    PARAMETERS_CHANGED = (0x2A, 0x00)
    MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
    ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)
    CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
    MEDIUM_NOT_PRESENT = (0x3A, 0x00)
    TARGET_OPERATING_CONDITIONS_HAVE_CHANGED = (0x3F, 0x00)
    INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
    REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
    INTERNAL_TARGET_FAILURE = (0x44, 0x00)

    @property
    def asc(self) -> int:
        """ADDITIONAL SENSE CODE byte."""
        return self.value[0]

    @property
    def ascq(self) -> int:
        """ADDITIONAL SENSE CODE QUALIFIER byte."""
        return self.value[1]

    @property
    def text(self) -> str:
        """The SPC-4 Annex D description, e.g. ``INVALID FIELD IN CDB``."""
        return _ASC_TEXT.get(self, self.name.replace("_", " "))

    @classmethod
    def lookup(cls, asc: int, ascq: int) -> AdditionalSense | None:
        """The member for ``(asc, ascq)``, or None if this table does not know it."""
        try:
            return cls((asc, ascq))
        except ValueError:
            return None


# Where the SPC-4 text has punctuation the member name cannot carry.
_ASC_TEXT: dict[AdditionalSense, str] = {
    AdditionalSense.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE:
        "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE",
    AdditionalSense.LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION:
        "LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION",
    AdditionalSense.LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE:
        "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE",
    AdditionalSense.LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE:
        "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE",
    AdditionalSense.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED:
        "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED",
    AdditionalSense.NOT_READY_TO_READY_CHANGE:
        "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED",
}


def additional_sense_text(asc: int, ascq: int) -> str:
    """Human-readable ASC/ASCQ: the table's text, else a generic description."""
    known = AdditionalSense.lookup(asc, ascq)
    if known is not None:
        return known.text
    if asc >= 0x80 or ascq >= 0x80:
        return "VENDOR SPECIFIC ADDITIONAL SENSE"
    return "UNKNOWN ADDITIONAL SENSE"


class PeripheralDeviceType(IntEnum):
    """PERIPHERAL DEVICE TYPE (INQUIRY byte 0 bits 4-0), the values we meet."""

    DIRECT_ACCESS = 0x00
    ENCLOSURE = 0x0D
    WELL_KNOWN_LUN = 0x1E
    UNKNOWN_OR_NO_DEVICE = 0x1F


class Tpgs(IntEnum):
    """TPGS field of standard INQUIRY (byte 5 bits 5-4), SPC-4 6.6.2."""

    NOT_SUPPORTED = 0
    IMPLICIT = 1
    EXPLICIT = 2
    IMPLICIT_AND_EXPLICIT = 3


class VpdPageCode(IntEnum):
    """VPD page codes (SPC-4 7.8, SBC-3 6.5)."""

    SUPPORTED_VPD_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    EXTENDED_INQUIRY_DATA = 0x86
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2
    REFERRALS = 0xB3


class DesignatorType(IntEnum):
    """DESIGNATOR TYPE of a VPD 0x83 designation descriptor (SPC-4 table 459)."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


class CodeSet(IntEnum):
    """CODE SET of a designation descriptor (SPC-4 table 458)."""

    BINARY = 0x1
    ASCII = 0x2
    UTF8 = 0x3


class Association(IntEnum):
    """ASSOCIATION of a designation descriptor (SPC-4 table 457)."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class ProtocolId(IntEnum):
    """PROTOCOL IDENTIFIER (SPC-4 table 362); meaningful only with PIV=1."""

    FIBRE_CHANNEL = 0x0
    PARALLEL_SCSI = 0x1
    SSA = 0x2
    IEEE_1394 = 0x3
    SRP = 0x4
    ISCSI = 0x5
    SAS = 0x6
    ADT = 0x7
    ATA = 0x8
    UAS = 0x9
    SOP = 0xA
    PCIE = 0xB
    NONE = 0xF


class AluaState(IntEnum):
    """Asymmetric access states (SPC-4 table 167; scsi_proto.h SCSI_ACCESS_STATE_*)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    LBA_DEPENDENT = 0x4
    OFFLINE = 0xE
    TRANSITIONING = 0xF


class ModePageCode(IntEnum):
    """Mode page codes (SPC-4 7.5, SBC-3 6.4)."""

    READ_WRITE_ERROR_RECOVERY = 0x01
    CACHING = 0x08
    CONTROL = 0x0A
    INFORMATIONAL_EXCEPTIONS_CONTROL = 0x1C
    ALL_PAGES = 0x3F


class PageControl(IntEnum):
    """PC field of MODE SENSE (CDB byte 2 bits 7-6), SPC-4 table 98."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3
