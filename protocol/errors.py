"""The error tree every switch-agent error grows from.

    SwitchAgentError
     └── DecodeError                bytes from outside did not parse
          ├── TruncatedError        fewer bytes than a length says
          ├── BadMagicError         not the structure we were told it is
          ├── ChecksumError         a CRC did not match
          ├── ValueRangeError       a field holds a value it may not hold
          ├── GenerationChangedError  the array's map changed mid-fetch
          ├── ChunkOverlapError     page-map chunks overlap or leave a gap
          ├── CapacityMismatchError  a page map's pages do not cover the LUN READ CAPACITY reports
          └── UnroutableLayoutError  a referrals layout dm-switch regions cannot carry
     └── ChangesUnavailableError    the array answers "fetch the whole map" to a changes-since question
     └── EncodeError                a caller asked us to build something invalid
     └── DmSwitchMessageError       a set_region_mappings message the kernel rejects

The agent's own errors (kernel calls, configuration) subclass SwitchAgentError
in ``agent/``. ``protocol/`` raises nothing but these.
"""

from __future__ import annotations


class SwitchAgentError(Exception):
    """Root of every error switch-agent raises on purpose."""


class DecodeError(SwitchAgentError):
    """Input bytes did not decode: names the codec, the field, what was expected and what came."""

    def __init__(self, codec: str, field: str, expected: object, got: object) -> None:
        self.codec = codec
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{codec}: {field}: expected {expected}, got {got}")


class TruncatedError(DecodeError):
    """Fewer bytes than the structure (or its own length field) needs."""


class BadMagicError(DecodeError):
    """A magic number, page code or format version is not the one expected."""


class ChecksumError(DecodeError):
    """A CRC32C did not match the bytes it covers."""


class ValueRangeError(DecodeError):
    """A field's value is outside what the format allows (e.g. a page-map entry >= member count)."""


class GenerationChangedError(DecodeError):
    """Chunks of one page-map fetch carried different map generations."""


class ChunkOverlapError(DecodeError):
    """A page-map chunk starts somewhere other than where the previous one ended."""


class CapacityMismatchError(DecodeError):
    """A page map's TOTAL PAGES x PAGE SIZE does not cover the LUN's capacity (READ CAPACITY(16)).

    Also what a resize between the two commands looks like: the fetch starts over.
    """


class UnroutableLayoutError(DecodeError):
    """The array's LBA layout (REPORT REFERRALS) cannot be expressed as one dm-switch region map."""


class ChangesUnavailableError(SwitchAgentError):
    """The array cannot say what changed since the host's generation (too old, reshaped, too large).

    Not a fault: the host fetches the whole map instead.
    """

    def __init__(self, reason: str, current_generation: int) -> None:
        self.reason = reason
        self.current_generation = current_generation
        super().__init__(f"no changes list ({reason}); the array is at generation {current_generation}")


class EncodeError(SwitchAgentError):
    """A builder was asked for something the format cannot express."""


class DmSwitchMessageError(SwitchAgentError):
    """A set_region_mappings token the kernel would reject with -EINVAL.

    ``applied`` counts the tokens applied before the bad one: the kernel
    applies messages token by token, so a rejected message is partly applied.
    """

    def __init__(self, token: str, position: int, reason: str, applied: int | None = None) -> None:
        self.token = token
        self.position = position
        self.reason = reason
        self.applied = applied
        super().__init__(f"set_region_mappings token {position} {token!r}: {reason}")
