"""The agent's use of GET PAGE MAP's changes-since form: a page move costs the move, and every way back to the whole map."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent import apply as apply_mod
from agent import orchestrator as orchestrator_mod
from agent.config import Config
from agent.orchestrator import Orchestrator
from protocol import dmswitch_encoder, pagemap_changes
from protocol.pagemap import GET_PAGE_MAP_OPCODE
from protocol.scsi import ScsiStatus
from tests.array.volume import ChangeLog
from tests.unit.fakes_hostile import forge_changes, hostile_paths, is_changes_since
from tests.unit.fakes_kernel import MiB, FakeArrayPath, FakeSystem


def make(tmp_path, **kw) -> tuple[FakeSystem, Orchestrator, list[bytes]]:
    """A routed LUN (4096 pages of 1 MiB, random owners) and a record of every GET PAGE MAP CDB after."""
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=4 * 1024 * MiB, page_size_bytes=MiB,
                        layout="random", **kw)
    orch = Orchestrator(Config(max_message_bytes=4096), system)
    asyncio.run(orch.reconcile(system.wwid))
    cdbs: list[bytes] = []
    handle = system.lu.handle

    def recording(member, cdb, data_out=b""):
        result = handle(member, cdb, data_out)
        if cdb[0] == GET_PAGE_MAP_OPCODE and result.status == ScsiStatus.GOOD:  # not a unit attention
            cdbs.append(bytes(cdb))
        return result

    system.lu.handle = recording
    return system, orch, cdbs


def reconcile(system: FakeSystem, orch: Orchestrator):
    return asyncio.run(orch.reconcile(system.wwid))


def whole_map_fetches(cdbs: list[bytes]) -> int:
    return sum(not pagemap_changes.is_changes_since_cdb(c) for c in cdbs)


def switch_regions(system: FakeSystem, lun) -> np.ndarray:
    return system.dm.devices[lun.stack.plan.switch_name].regions


def test_a_move_is_fetched_and_sent_as_its_changes(tmp_path, monkeypatch):
    system, orch, cdbs = make(tmp_path)
    before = orch.luns[system.wwid].stack.page_map.owners.copy()
    sent_before = orch.luns[system.wwid].message_bytes_sent
    system.volume.move_pages(40 / 4096)

    def no_whole_map_work(*args, **kwargs):
        raise AssertionError("the changed-pages path looked at the whole map")

    # O(changes): neither the whole-map diff encoder nor the whole-map comparison runs.
    monkeypatch.setattr(dmswitch_encoder, "encode_region_mappings", no_whole_map_work)
    monkeypatch.setattr(orchestrator_mod, "pages_moved", no_whole_map_work)
    lun = reconcile(system, orch)
    assert whole_map_fetches(cdbs) == 0 and len(cdbs) == 1
    assert lun.stack.page_map.generation == system.volume.generation
    assert np.array_equal(lun.stack.page_map.owners, system.volume.owners)
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0
    moved = np.flatnonzero(before != system.volume.owners)
    assert moved.size == 40 and lun.moved_pages.tolist() == moved.tolist()
    assert np.array_equal(switch_regions(system, lun), lun.stack.page_map.owners)
    assert lun.message_bytes_sent - sent_before < 40 * 12  # an index and a path per moved page


def test_nothing_changed_sends_nothing(tmp_path):
    system, orch, cdbs = make(tmp_path)
    sent = orch.luns[system.wwid].messages_sent
    lun = reconcile(system, orch)
    assert whole_map_fetches(cdbs) == 0 and lun.messages_sent == sent


def test_too_old_falls_back_to_the_whole_map(tmp_path):
    system, orch, cdbs = make(tmp_path)
    for _ in range(ChangeLog.MAX_GENERATIONS + 1):
        system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    assert pagemap_changes.is_changes_since_cdb(cdbs[0]) and whole_map_fetches(cdbs) == 1
    assert lun.stack.page_map.changed_pages is None and lun.last_error is None
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


@pytest.mark.parametrize("kind", ["bad-crc", "truncated", "entry-out-of-range"])
def test_a_bad_changes_answer_falls_back_to_the_whole_map(tmp_path, kind):
    system, orch, cdbs = make(tmp_path)
    system.volume.move_pages(0.01)
    system.volume.corrupt_next_map(kind, count=1)  # the changes answer only: the whole map is honest
    lun = reconcile(system, orch)
    assert pagemap_changes.is_changes_since_cdb(cdbs[0]) and whole_map_fetches(cdbs) >= 1
    assert lun.last_error is None and lun.stack.page_map.generation == system.volume.generation
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_resize_is_answered_reshaped_and_builds_a_new_epoch(tmp_path):
    system, orch, cdbs = make(tmp_path)
    epoch = orch.luns[system.wwid].epoch
    system.resize(5 * 1024 * MiB)
    lun = reconcile(system, orch)
    assert pagemap_changes.is_changes_since_cdb(cdbs[0]) and whole_map_fetches(cdbs) >= 1
    assert lun.epoch == epoch + 1 and lun.stack.page_map.total_pages == 5 * 1024
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_new_member_changes_the_member_table_so_the_whole_map_is_fetched(tmp_path):
    system, orch, cdbs = make(tmp_path)
    system.volume.add_member()
    system.add_path(3)
    lun = reconcile(system, orch)
    assert whole_map_fetches(cdbs) >= 1 and len(lun.stack.page_map.members) == 4
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_1_1_array_is_only_ever_asked_the_whole_way(tmp_path):
    system, orch, cdbs = make(tmp_path)
    system.volume.answers_changes = False
    system.volume.move_pages(0.01)
    lun = reconcile(system, orch)
    assert cdbs and not any(pagemap_changes.is_changes_since_cdb(c) for c in cdbs)
    assert lun.stack.page_map.generation == system.volume.generation
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_failed_upload_makes_the_next_changes_go_the_whole_diff_way(tmp_path, monkeypatch):
    """After a rejected message the switch's content is unknown: a changes list is no longer enough."""
    system, orch, cdbs = make(tmp_path)
    lun = orch.luns[system.wwid]
    lun.stack.kernel_map = np.full(lun.stack.page_map.total_pages, -1, dtype=lun.stack.page_map.owners.dtype)
    system.volume.move_pages(0.01)
    assert apply_mod._changed_regions(lun.stack, lun.stack.page_map) is None
    lun = reconcile(system, orch)
    assert whole_map_fetches(cdbs) == 0  # the changes were fetched, and sent against the whole map
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_move_costs_one_identify_per_path_side_by_side_and_one_changes_command(tmp_path):
    """A routed LUN's array is known: no INQUIRY or VPD 0x00 again, every path asked its member at once."""
    system, orch, _cdbs = make(tmp_path, paths_per_member=1)
    commands: list[bytes] = []
    handle = system.lu.handle

    def recording(member, cdb, data_out=b""):
        result = handle(member, cdb, data_out)
        if result.status == ScsiStatus.GOOD:
            commands.append(bytes(cdb[:3]))
        return result

    system.lu.handle = recording
    system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    vpd_c0 = bytes([0x12, 0x01, 0xC0])
    assert sorted(commands) == sorted([vpd_c0] * 3 + [bytes([GET_PAGE_MAP_OPCODE, 1, 0])])
    assert all(p.usable for p in lun.topology.paths) and lun.stack.page_map.changed_since is not None
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def _record_order(system: FakeSystem) -> list[str]:
    """What reaches the array and the switch, in order: "vpd" per member question, "msg" per message."""
    events: list[str] = []
    handle, message = system.lu.handle, system.dm.target_message

    def recording(member, cdb, data_out=b""):
        if bytes(cdb[:3]) == bytes([0x12, 0x01, 0xC0]):
            events.append("vpd")
        return handle(member, cdb, data_out)

    def messaging(*args, **kwargs):
        events.append("msg")
        return message(*args, **kwargs)

    system.lu.handle = recording
    system.dm.target_message = messaging
    return events


def test_a_move_is_routed_before_the_paths_are_asked_their_members_again(tmp_path):
    """Paths on the sessions they answered over keep their members for the routing; asked after it."""
    system, orch, _cdbs = make(tmp_path, paths_per_member=1)
    events = _record_order(system)
    system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    assert "msg" in events and events.index("msg") < events.index("vpd"), events
    assert events.count("vpd") == 3  # every path confirmed once the pages were routed
    assert not any(p.remembered for p in lun.topology.paths)
    assert system.misrouted_pages(f"switch-{system.wwid}") == 0


def test_a_path_on_a_new_session_is_asked_its_member_before_routing(tmp_path):
    """Same disk name and major:minor, new iSCSI session (logged out and in): what it lands on is asked."""
    system, orch, _cdbs = make(tmp_path, paths_per_member=1)
    lun = orch.luns[system.wwid]
    first, second = lun.topology.paths[0], lun.topology.paths[1]
    lost = system.paths[first.device].member_number
    system.paths[first.device] = FakeArrayPath(system.lu, system.paths[second.device].member_number, first.device)
    events = _record_order(system)
    system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    assert events[0] == "vpd" and events.count("vpd") == 1 + 2  # the new session's first, the rest after
    assert lun.topology.paths[0].member_id == second.member_id
    assert system.misrouted_pages(f"switch-{system.wwid}") == _pages_of(system, lost)  # it has no path now


def test_a_path_that_stops_answering_is_not_remembered(tmp_path):
    """A path that is not running (here: its transport gone) is asked, and found unusable, before routing."""
    system, orch, _cdbs = make(tmp_path, paths_per_member=2)
    first = orch.luns[system.wwid].topology.paths[0]
    system.paths[first.device].broken = True
    system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    assert not lun.topology.paths[0].usable
    assert first.dev not in {d for own, other in lun.stack.plan.leg_paths for d in (*own, *other)}


def test_a_path_that_now_lands_on_another_member_is_still_seen(tmp_path):
    """A portal moved under a live session: the routing goes out on the remembered member, the
    confirmation after it finds the change, and the reconcile routes again with every path asked."""
    system, orch, _cdbs = make(tmp_path, paths_per_member=1)
    lun = orch.luns[system.wwid]
    first, second = lun.topology.paths[0], lun.topology.paths[1]
    # The array now answers the first path as the second's member (a portal moved).
    lost = system.paths[first.device].member_number
    system.paths[first.device].member_number = system.paths[second.device].member_number
    system.volume.move_pages(1 / 4096)
    lun = reconcile(system, orch)
    assert lun.topology.paths[0].member_id == second.member_id
    assert system.misrouted_pages(f"switch-{system.wwid}") == _pages_of(system, lost)  # it has no path now


def _pages_of(system: FakeSystem, number: int) -> int:
    return int((system.volume.owners == system.volume.index_of(number)).sum())


@pytest.mark.parametrize("garble", [
    lambda a: a[:20],  # cut short
    lambda a: bytes(b ^ 0x5A for b in a),  # every byte flipped (the CRCs no longer match)
    lambda a: forge_changes(a, total_pages=1 << 40),  # signed, but a volume no host has
    lambda a: forge_changes(a, member_count=0),
    lambda a: forge_changes(a, run_count=0xFFFFFFFF),
], ids=["short", "flipped", "huge-volume", "no-members", "run-count"])
def test_the_second_look_after_a_join_keeps_the_map_it_had_on_garbage(tmp_path, garble):
    """map_now (the map asked again beside the wait for a joining member's paths) takes the array's
    answer only when it decodes and fits: else the map it had, and nothing else is asked."""
    system, orch, cdbs = make(tmp_path)
    lun = orch.luns[system.wwid]
    had = lun.stack.page_map
    system.volume.move_pages(0.01)
    hostile_paths(system, rewrite=lambda cdb, a: garble(a) if is_changes_since(cdb) else a)
    assert asyncio.run(orch.discovery.map_now(lun.topology, had)) is had
    assert len(cdbs) == 1 and is_changes_since(cdbs[0])  # one question, no whole-map fetch after it


def test_the_second_look_after_a_join_takes_a_good_answer(tmp_path):
    system, orch, _cdbs = make(tmp_path)
    lun = orch.luns[system.wwid]
    system.volume.move_pages(0.01)
    now = asyncio.run(orch.discovery.map_now(lun.topology, lun.stack.page_map))
    assert now.generation == system.volume.generation
    assert np.array_equal(now.owners, system.volume.owners)
