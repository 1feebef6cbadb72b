"""Map-source plug-ins: selection, the referrals source over a LIO-like LUN, and the pipeline on top."""

from __future__ import annotations

import asyncio

import pytest

from agent import mapsources
from agent.config import ArrayMatch, Config, ConfigError, config_from_mapping
from agent.discovery import NotOurArrayError
from agent.orchestrator import Orchestrator
from protocol.errors import ValueRangeError
from protocol.pagemap import UNALLOCATED
from tests.unit.fakes_kernel import FakeSystem
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
