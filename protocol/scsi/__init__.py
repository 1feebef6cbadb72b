"""Pure SCSI codecs: CDBs, INQUIRY/VPD, READ CAPACITY, sense, MODE SENSE, referrals, RTPG.

Bytes in, frozen dataclasses out, and back: the host agent builds CDBs and
decodes responses; the emulated array (tests/array/) parses CDBs and
encodes responses with the same functions. No I/O here.

Naming: ``build_*_cdb`` / ``parse_*_cdb`` for commands, ``encode_*`` /
``decode_*`` for parameter data. Decoders raise only
``protocol.errors.DecodeError`` subclasses; a ``TruncatedError``'s
``expected`` is the byte count the whole structure needs, so the caller can
retry with that allocation length. Encoders raise ``EncodeError``.

Modules: constants, cdb, inquiry, vpd, capacity, sense, mode, referrals, alua.
"""

from protocol.scsi.alua import *  # noqa: F401,F403
from protocol.scsi.alua import __all__ as _alua_all
from protocol.scsi.capacity import *  # noqa: F401,F403
from protocol.scsi.capacity import __all__ as _capacity_all
from protocol.scsi.cdb import *  # noqa: F401,F403
from protocol.scsi.cdb import __all__ as _cdb_all
from protocol.scsi.constants import (
    AdditionalSense,
    AluaState,
    Association,
    CodeSet,
    DesignatorType,
    MaintenanceIn,
    ModePageCode,
    Opcode,
    PageControl,
    PeripheralDeviceType,
    ProtocolId,
    ScsiStatus,
    SenseKey,
    ServiceActionIn16,
    Tpgs,
    VpdPageCode,
    additional_sense_text,
    cdb_length_for_opcode,
)
from protocol.scsi.inquiry import *  # noqa: F401,F403
from protocol.scsi.inquiry import __all__ as _inquiry_all
from protocol.scsi.mode import *  # noqa: F401,F403
from protocol.scsi.mode import __all__ as _mode_all
from protocol.scsi.referrals import *  # noqa: F401,F403
from protocol.scsi.referrals import __all__ as _referrals_all
from protocol.scsi.sense import *  # noqa: F401,F403
from protocol.scsi.sense import __all__ as _sense_all
from protocol.scsi.vpd import *  # noqa: F401,F403
from protocol.scsi.vpd import __all__ as _vpd_all

_constants_all = [
    "AdditionalSense", "AluaState", "Association", "CodeSet", "DesignatorType",
    "MaintenanceIn", "ModePageCode", "Opcode", "PageControl", "PeripheralDeviceType",
    "ProtocolId", "ScsiStatus", "SenseKey", "ServiceActionIn16", "Tpgs", "VpdPageCode",
    "additional_sense_text", "cdb_length_for_opcode",
]

__all__ = [
    *_constants_all, *_cdb_all, *_inquiry_all, *_vpd_all, *_capacity_all, *_sense_all,
    *_mode_all, *_referrals_all, *_alua_all,
]
