"""Type stub of the compiled encoder core, protocol/_dmswitch_encode.c (see protocol.dmswitch_encoder)."""

import numpy as np

def encode(
    t: np.ndarray,
    need: np.ndarray | None,
    unknown: np.ndarray | None,
    base: int,
    max_message_bytes: int,
    max_tokens: int,
    sample: np.ndarray | None,
    /,
) -> list[str]:
    """Plan and cut ``set_region_mappings`` messages for ``t``, byte-identical to the pure-Python core.

    ``t`` (1-D signed integer array, no negatives) is the map to write, as
    dmswitch_encoder._target chose it; ``need`` and ``unknown`` are bool
    masks as long as ``t`` (None: every region needed / none unknown);
    ``base`` is the region number of ``t[0]``; ``sample`` (int64 region
    indexes, None: every region) picks the regions whose matches vote for
    the dominant copy distances. Raises ValueError when max_message_bytes
    cannot hold one token, TypeError/ValueError on malformed arrays.
    """
