"""Map-source plug-ins: selection, the referrals source over a LIO-like LUN, and the pipeline on top."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from agent import mapsources
from agent.mapsources import pagemap as mapsource
from agent.mapsources import referrals as referrals_source
from agent.config import ArrayMatch, Config, ConfigError, config_from_mapping
from agent.discovery import NotOurArrayError
from agent.orchestrator import Orchestrator
from protocol import pagemap
from protocol.errors import CapacityMismatchError, DecodeError, UnroutableLayoutError, ValueRangeError
from protocol.pagemap import UNALLOCATED
from tests.unit.fakes_hostile import (forge_page_map, hostile_paths, is_get_page_map, is_read_capacity_16,
                                      read_capacity_16)
from tests.unit.fakes_kernel import MiB as MIB, FakeSystem
from tests.unit.fakes_referrals import FakeLioLun, FakeLioPath, FakeLioSystem, segment

LIO = ArrayMatch("LIO-ORG", "FILEIO", "referrals")
MIB_BLOCKS = 2048  # 512-byte blocks


def run(coro):
    return asyncio.run(coro)


def striped_lun(groups=(1, 2, 3), segments=12, seg_blocks=8 * MIB_BLOCKS, **kw) -> FakeLioLun:
    segs = [segment(k * seg_blocks, (k + 1) * seg_blocks - 1, groups[k % len(groups)], groups)
            for k in range(segments)]
    return FakeLioLun(capacity_blocks=segments * seg_blocks, segments=segs, groups=groups, **kw)


def uneven_lun() -> FakeLioLun:
    groups = (11, 12, 13, 14)
    sizes = [(3, 12), (1, 14), (6, None), (2, 11), (5, 13), (1, 12), (4, 14)]  # (MiB, optimized group)
    segs, at = [], 0
    for mib, owner in sizes:
        segs.append(segment(at, at + mib * MIB_BLOCKS - 1, owner, groups))
        at += mib * MIB_BLOCKS
    return FakeLioLun(capacity_blocks=at + 2 * MIB_BLOCKS, segments=segs, groups=groups)


# -- selection -------------------------------------------------------------------------

def test_auto_picks_page_map_when_vpd_c0_is_listed(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "s")
    assert run(mapsources.choose("auto", system.open_path("sdb"))).name == "page-map"


def test_auto_picks_referrals_when_only_vpd_b3_is_listed():
    assert run(mapsources.choose("auto", FakeLioPath(striped_lun(), 1, "sdb"))).name == "referrals"


def test_auto_with_neither_is_a_clear_error():
    lun = striped_lun()
    real = lun._inquiry
    lun._inquiry = lambda port, request: (b"\x00\x00\x00\x02\x00\x83" if request.evpd and request.page_code == 0
                                          else real(port, request))
    with pytest.raises(mapsources.NoMapSourceError, match="neither"):
        run(mapsources.choose("auto", FakeLioPath(lun, 1, "sdb")))


def test_auto_refuses_a_lio_lun_without_an_lba_map():
    lun = striped_lun()
    lun.segments = []  # VPD 0xB3 still listed; R_SUP clear
    with pytest.raises(mapsources.NoMapSourceError, match="R_SUP"):
        run(mapsources.choose("auto", FakeLioPath(lun, 1, "sdb")))


def test_explicit_settings_need_no_probe():
    lun = striped_lun()
    assert run(mapsources.choose("referrals", FakeLioPath(lun, 1, "sdb"))).name == "referrals"
    assert lun.commands == []


@pytest.mark.parametrize("entry, ok", [
    ({"vendor": "LIO-ORG", "product": "FILEIO", "map_source": "referrals"}, True),
    ({"vendor": "LIO-ORG", "product": "FILEIO", "map_source": "auto"}, True),
    ({"vendor": "LIO-ORG", "product": "FILEIO"}, True),
    ({"vendor": "LIO-ORG", "product": "FILEIO", "map_source": "alua"}, False),
    ({"vendor": "LIO-ORG", "product": "FILEIO", "map_source": 3}, False),
    ({"vendor": "LIO-ORG", "product": "FILEIO", "other": "x"}, False),
])
def test_map_source_in_the_config(entry, ok):
    if ok:
        array = config_from_mapping({"arrays": [entry]}).arrays[0]
        assert array.map_source == entry.get("map_source", "page-map")
    else:
        with pytest.raises(ConfigError, match=r"arrays\[0\]"):
            config_from_mapping({"arrays": [entry]})


# -- the referrals source ------------------------------------------------------------------

@pytest.mark.parametrize("tpg_designator", [True, False])
def test_a_path_is_identified_by_its_target_port_group(tpg_designator):
    lun = striped_lun(groups=(5, 9, 7), tpg_designator=tpg_designator)
    source = mapsources.get("referrals")
    assert [run(source.identify(FakeLioPath(lun, port, "sdx"))) for port in (1, 2, 3)] == \
        [(5, "tpg5"), (9, "tpg9"), (7, "tpg7")]
    assert (0xA3 in {op for _, op in lun.commands}) == (not tpg_designator)  # RTPG only when needed


def test_a_port_in_no_group_is_reported():
    lun = striped_lun(tpg_designator=False)
    lun.groups = (1, 2, 3)
    path = FakeLioPath(lun, 4, "sdx")  # relative port 4: RTPG lists only 1..3
    with pytest.raises(ValueRangeError, match="relative target port 4"):
        run(mapsources.get("referrals").identify(path))


def test_fetch_and_poll_agree_and_follow_changes():
    lun = uneven_lun()
    source = mapsources.get("referrals")
    path = FakeLioPath(lun, 1, "sdb")
    page_map = run(source.fetch(path, restarts=0))
    assert page_map.page_size_sectors == MIB_BLOCKS
    assert [m.member_id for m in page_map.members] == [11, 12, 13, 14]
    ids = [m.member_id for m in page_map.members]
    got = [ids[o] if o != UNALLOCATED else None for o in page_map.owners]
    assert got == [12] * 3 + [14] + [None] * 6 + [11] * 2 + [13] * 5 + [12] + [14] * 4 + [None] * 2
    assert run(source.poll_generation(path)) == page_map.generation
    lun.segments[0] = segment(0, 3 * MIB_BLOCKS - 1, 13, lun.groups)
    assert run(source.poll_generation(path)) != page_map.generation


def test_an_empty_lba_map_is_a_command_error_not_a_map():
    lun = striped_lun()
    lun.segments = []  # LIO answers INVALID COMMAND OPERATION CODE
    with pytest.raises(Exception, match="CHECK CONDITION"):
        run(mapsources.get("referrals").fetch(FakeLioPath(lun, 1, "sdb"), restarts=0))


# -- the pipeline on a LIO-like LUN -----------------------------------------------------------

def routed_groups(system: FakeLioSystem, lun_state) -> list[set[int]]:
    """Per region: the target port groups of the paths its leg prefers."""
    top = lun_state.stack.plan.top_name
    return [{system.group_of_dev(d) for d in system.dm.route_region(top, r)}
            for r in range(lun_state.stack.plan.region_count)]


@pytest.mark.parametrize("make_lun", [lambda: striped_lun(), lambda: striped_lun(groups=(1, 2, 3, 4)), uneven_lun],
                         ids=["3 groups", "4 groups", "uneven"])
def test_every_region_goes_to_its_optimized_group(make_lun):
    system = FakeLioSystem(make_lun())
    orch = Orchestrator(Config(arrays=(LIO,), max_message_bytes=4096), system)
    lun = run(orch.reconcile(system.wwid))
    assert lun.state == "routed" and lun.topology.map_source == "referrals"
    page_map = lun.stack.page_map
    ids = [m.member_id for m in page_map.members]
    for region, groups in enumerate(routed_groups(system, lun)):
        owner = int(page_map.owners[region])
        if owner != UNALLOCATED:
            assert groups == {ids[owner]}, f"region {region}"
    assert orch.status(lun).map_source == "referrals"


def test_a_lio_lun_is_ours_only_when_configured():
    system = FakeLioSystem(striped_lun())
    orch = Orchestrator(Config(), system)  # default config: only the vendor protocol's array
    with pytest.raises(NotOurArrayError):
        run(orch.reconcile(system.wwid))
    assert not [d for d in system.dm.devices.values() if d.uuid.startswith("SWAGENT-")]


def test_a_changed_layout_is_polled_and_sent_as_a_difference():
    system = FakeLioSystem(striped_lun())
    orch = Orchestrator(Config(arrays=(LIO,), max_message_bytes=4096), system)
    lun = run(orch.reconcile(system.wwid))
    generation = lun.stack.page_map.generation
    assert run(orch.poll_generations([lun])) == {lun.wwid: generation}
    system.lun.segments[4] = segment(4 * 8 * MIB_BLOCKS, 5 * 8 * MIB_BLOCKS - 1, 3, system.lun.groups)
    assert run(orch.poll_generations([lun]))[lun.wwid] not in (None, generation)
    sent = lun.messages_sent
    epoch = lun.epoch
    lun = run(orch.reconcile(system.wwid))
    assert lun.epoch == epoch and lun.messages_sent == sent + 1  # same switch, one small message
    assert routed_groups(system, lun)[4] == {3}


def test_an_unroutable_layout_keeps_the_routing_there_is():
    system = FakeLioSystem(striped_lun())
    orch = Orchestrator(Config(arrays=(LIO,), max_message_bytes=4096), system)
    run(orch.reconcile(system.wwid))
    before = {n: d.live for n, d in system.dm.devices.items()}
    system.lun.segments.append(segment(5, 6, 1, system.lun.groups))  # overlaps segment 0
    with pytest.raises(ValueRangeError, match="overlap"):
        run(orch.reconcile(system.wwid))
    assert {n: d.live for n, d in system.dm.devices.items()} == before
    assert orch.luns[system.wwid].state == "routed" and "overlap" in orch.luns[system.wwid].last_error


# -- a hostile array: bounded work, off the event loop, typed errors (issue #13) ------------------

async def _with_heartbeat(coro, tick: float = 0.01):
    """Run `coro` beside a ticker; returns (its result or exception, the longest gap between ticks)."""
    loop = asyncio.get_running_loop()
    gaps = [0.0]

    async def ticker():
        last = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker start its clock
    try:
        outcome = await coro
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        outcome = exc
    task.cancel()
    return outcome, max(gaps)


@pytest.mark.parametrize("boundary, capacity, block_bytes, error", [
    (2**32 - 5, 2**33, 1024, UnroutableLayoutError),   # prime: took ~9 minutes on the loop
    (2**54 - 33, 2**54 - 1, 512, UnroutableLayoutError),  # the worst search a loff_t-sized LUN allows
    (2**61 - 1, 2**62, 512, ValueRangeError),           # never ended; a LUN no kernel holds
    (5, 2**64, 512, ValueRangeError),                   # READ CAPACITY(16) RETURNED LBA 2^64-1
], ids=["prime 2^32-5", "prime 2^54-33", "2^61-1", "capacity 2^64"])
def test_a_hostile_referrals_layout_never_stalls_the_event_loop(boundary, capacity, block_bytes, error,
                                                                monkeypatch):
    lun = FakeLioLun(capacity_blocks=capacity, block_bytes=block_bytes, groups=(1, 2),
                     segments=[segment(0, boundary - 1, 1, (1, 2)), segment(boundary, capacity - 1, 2, (1, 2))])
    converted_on_loop = _spy_thread(monkeypatch, referrals_source, "referral_region_map")
    outcome, gap = run(_with_heartbeat(mapsources.get("referrals").fetch(FakeLioPath(lun, 1, "sdb"), restarts=0)))
    assert isinstance(outcome, error), outcome
    assert gap < 0.2 and converted_on_loop == [False]


def _spy_thread(monkeypatch, module, name: str) -> list[bool]:
    """Replace module.name with itself plus a record of whether each call ran on the main (loop) thread."""
    calls: list[bool] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def page_map_system(tmp_path, **kw) -> FakeSystem:
    """A 64-page LUN (64 MiB in 1 MiB pages) whose paths a test can make hostile."""
    system = FakeSystem(tmp_path=tmp_path / "s", size_bytes=64 * MIB, page_size_bytes=kw.pop("page", MIB), **kw)
    hostile_paths(system)
    return system


def test_a_forged_page_count_is_refused_before_anything_is_allocated(tmp_path):
    import tracemalloc

    path = page_map_system(tmp_path).open_path("sdb")
    path.rewrite = lambda cdb, data: forge_page_map(data, total_pages=2**40) if is_get_page_map(cdb) else data
    tracemalloc.start()
    try:
        with pytest.raises(CapacityMismatchError, match="total pages") as info:
            run(mapsource.fetch_page_map(path, restarts=1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, DecodeError) and info.value.got == 2**40  # numpy's MemoryError before
    assert peak < 1 << 20
    assert path.commands == 2 * 2  # READ CAPACITY + one chunk, twice (a resize looks the same: one restart)


def test_a_map_trickled_one_entry_per_chunk_is_stopped(tmp_path):
    path = page_map_system(tmp_path).open_path("sdb")

    def one_entry(cdb, data):
        if not is_get_page_map(cdb):
            return data
        start = pagemap.parse_get_page_map_cdb(cdb).start_page
        one = pagemap.encode_page_map_response(np.zeros(1, dtype=np.int8), generation=1, page_size_sectors=2048,
                                               members=(pagemap.Member(1, "m"),), start_page=0,
                                               allocation_length=4096)
        return forge_page_map(one, first_page=start, total_pages=2**31)

    path.rewrite = one_entry
    path.rewrite_cdb = lambda cdb: pagemap.build_get_page_map_cdb(0, 4096) if is_get_page_map(cdb) else cdb
    with pytest.raises(DecodeError):  # 2^31 pages of 1 MiB are not this 64 MiB LUN
        run(mapsource.fetch_page_map(path, restarts=0))
    assert path.commands == 2  # made 111k commands in 3 s and went on

    # The right page count, but the array answers 4 entries a chunk to an allocation that holds 64 MiB of them.
    path.rewrite = None
    path.commands = 0
    path.rewrite_cdb = lambda cdb: pagemap.build_get_page_map_cdb(
        pagemap.parse_get_page_map_cdb(cdb).start_page, 64 + 3 * 32 + 1 + 4) if is_get_page_map(cdb) else cdb
    with pytest.raises(ValueRangeError, match="chunks") as info:
        run(mapsource.fetch_page_map(path, restarts=0))
    assert info.value.got == pagemap.CHUNK_SLACK * 1 + pagemap.CHUNK_SLACK + 1 and path.commands == 1 + info.value.got


def test_a_4kn_lun_needs_pages_of_whole_blocks(tmp_path):
    def four_kn(cdb, data):
        if not is_read_capacity_16(cdb):
            return data
        return read_capacity_16(64 * MIB // 4096, 4096)

    system = page_map_system(tmp_path, page=2048)  # pages of 4 sectors: half a 4 KiB block
    system.open_path("sdb").rewrite = four_kn
    with pytest.raises(ValueRangeError, match="page size") as info:
        run(mapsource.fetch_page_map(system.open_path("sdb"), restarts=0))
    assert info.value.got == 2048

    system = page_map_system(tmp_path / "b", page=8192)  # two whole 4 KiB blocks a page: fine
    system.open_path("sdb").rewrite = four_kn
    page_map = run(mapsource.fetch_page_map(system.open_path("sdb"), restarts=0))
    assert page_map.total_pages == 64 * MIB // 8192 and page_map.page_size_sectors == 16


def test_a_large_page_map_chunk_is_decoded_off_the_event_loop(tmp_path, monkeypatch):
    # 4M pages of 512 bytes at 2 bits: a 1 MiB chunk; decoding it on the loop stalled every other LUN.
    system = FakeSystem(tmp_path=tmp_path / "s", size_bytes=2 * 1024 * MIB, page_size_bytes=512)
    path = system.open_path("sdb")
    path.max_transfer = 4 * MIB
    decoded_on_loop = _spy_thread(monkeypatch, pagemap, "decode_page_map_response")
    page_map = run(mapsource.fetch_page_map(path, restarts=0))
    assert page_map.total_pages == 4 * 1024 * 1024 and decoded_on_loop == [False]
