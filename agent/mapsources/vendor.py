"""The open vendor protocol (docs/protocol.md) as a map source: VPD 0xC0 and GET PAGE MAP."""

from __future__ import annotations

from agent import mapsource
from agent.mapsource import ScsiPath
from protocol.pagemap import PageMap


class PageMapSource:
    """Member from VPD 0xC0, map from GET PAGE MAP, generation from its 64-byte header."""

    name = "page-map"

    async def identify(self, path: ScsiPath) -> tuple[int, str]:
        identity = await mapsource.read_member_identity(path)
        return identity.member_id, identity.name

    async def fetch(self, path: ScsiPath, *, restarts: int) -> PageMap:
        return await mapsource.fetch_page_map(path, restarts=restarts)

    async def poll_generation(self, path: ScsiPath) -> int:
        return (await mapsource.poll_map_header(path)).generation
