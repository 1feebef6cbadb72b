"""What the orchestrator needs of a map protocol: the MapSource every plug-in in this package meets."""

from __future__ import annotations

from typing import Protocol

from agent.scsipath import ScsiPath
from protocol.pagemap import PageMap


class MapSource(Protocol):
    """What the orchestrator needs of a map protocol."""

    name: str

    async def identify(self, path: ScsiPath) -> tuple[int, str]:
        """(member id, member name) of the member / port group this path lands on."""
        ...

    async def fetch(self, path: ScsiPath, *, restarts: int) -> PageMap:
        """The LUN's whole region map, owners indexing its members (UNALLOCATED = don't care)."""
        ...

    async def fetch_changes(self, path: ScsiPath, current: PageMap) -> PageMap | None:
        """`current` brought up to date from only what changed since its generation (the result's
        `changed_pages` say which pages); None when the protocol or the array cannot say (then fetch)."""
        ...

    async def poll_generation(self, path: ScsiPath) -> int:
        """Cheaply: a number that changes when the map does (compared with PageMap.generation)."""
        ...
