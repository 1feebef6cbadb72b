"""The per-LUN pipeline over fake kernel layers: the emulated array's LU and a dm that applies messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import threading
import time

import numpy as np
import pytest

from agent.config import Config, config_from_mapping
from agent.discovery import LunNotFoundError, NotOurArrayError
from agent.orchestrator import Orchestrator
from agent.kernel.dm_abi import DmCommand
from agent.kernel.dm_errors import DmIoctlError
from protocol.dmtable import DmUdevFlags
from protocol.errors import SwitchAgentError
from tests.unit.fakes_kernel import MiB, FakeSystem, ManyLunSystem

CONFIG = Config(max_message_bytes=4096)


def make(tmp_path, config: Config = CONFIG, **kw) -> tuple[FakeSystem, Orchestrator]:
    system = FakeSystem(tmp_path=tmp_path / "store", **kw)
    return system, Orchestrator(config, system)


def reconcile(orch: Orchestrator, wwid: str):
    return asyncio.run(orch.reconcile(wwid))


def top_name(system: FakeSystem) -> str:
    return f"switch-{system.wwid}"


def small_chunks(system: FakeSystem) -> None:
    """Paths that move 512 bytes per command, so a fetch of 3072 pages takes several chunks."""
    assert system.volume.total_pages >= 3072
    for path in system.paths.values():
        path.max_transfer = 512


@pytest.mark.parametrize("layout", ["striped", "random", "seed"])
def test_routes_every_page_to_its_owner(tmp_path, layout):
    system, orch = make(tmp_path, layout=layout)
    lun = reconcile(orch, system.wwid)
    assert lun.state == "routed"
    assert system.misrouted_pages(top_name(system)) == 0
    # Three members: three legs, one switch, and the top device; nothing else of ours.
    ours = sorted(n for n, d in system.dm.devices.items() if d.uuid.startswith("SWAGENT-"))
    assert len(ours) == 5 and top_name(system) in ours


def test_top_device_appears_only_after_the_whole_map_is_in(tmp_path):
    system, orch = make(tmp_path, layout="random")
    reconcile(orch, system.wwid)
    log = system.dm.log
    top_created = log.index(("create", top_name(system)))
    last_message = max(i for i, (op, _) in enumerate(log) if op == "message")
    assert last_message < top_created


def test_legs_and_switch_are_hidden_from_other_udev_rules(tmp_path):
    system, orch = make(tmp_path)
    reconcile(orch, system.wwid)
    for name, device in system.dm.devices.items():
        if device.uuid.startswith("SWAGENT-leg") or device.uuid.startswith("SWAGENT-sw"):
            assert device.udev_flags == DmUdevFlags.HIDDEN, name
        if device.uuid.startswith("SWAGENT-top"):
            assert device.udev_flags == 0


def test_each_leg_prefers_its_members_paths_and_falls_back_to_the_rest(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=2)
    lun = reconcile(orch, system.wwid)
    for k, (own, other) in enumerate(lun.stack.plan.leg_paths):
        number = system.volume.members[k].number
        assert {system.member_of_dev(d) for d in own} == {number} and len(own) == 2
        assert number not in {system.member_of_dev(d) for d in other} and len(other) == 4


def test_page_moves_send_only_the_difference(tmp_path):
    system, orch = make(tmp_path, size_bytes=16 * 1024 * MiB, page_size_bytes=4 * MiB, layout="random")
    lun = reconcile(orch, system.wwid)
    first_bytes = lun.message_bytes_sent
    system.volume.move_pages(0.02)
    before = set(system.dm.devices)
    lun = reconcile(orch, system.wwid)
    assert system.misrouted_pages(top_name(system)) == 0
    assert set(system.dm.devices) == before  # no rebuild
    assert 0 < lun.message_bytes_sent - first_bytes < first_bytes / 5


def test_unchanged_map_sends_nothing(tmp_path):
    system, orch = make(tmp_path, layout="random")
    lun = reconcile(orch, system.wwid)
    sent = lun.messages_sent
    assert reconcile(orch, system.wwid).messages_sent == sent


@pytest.mark.parametrize("kind", ["bad-crc", "truncated", "entry-out-of-range", "generation-churn"])
def test_corrupt_map_on_first_build_leaves_nothing_behind(tmp_path, kind):
    system, orch = make(tmp_path, config=Config(fetch_restarts=2), page_size_bytes=MiB)
    small_chunks(system)
    system.volume.corrupt_next_map(kind, count=100)
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    assert [n for n, d in system.dm.devices.items() if d.uuid.startswith("SWAGENT-")] == []
    lun = orch.luns[system.wwid]
    assert lun.state == "error" and lun.last_error


@pytest.mark.parametrize("kind", ["bad-crc", "truncated", "entry-out-of-range", "generation-churn"])
def test_corrupt_map_later_keeps_the_previous_routing(tmp_path, kind):
    system, orch = make(tmp_path, layout="random", config=Config(fetch_restarts=2), page_size_bytes=MiB)
    small_chunks(system)
    reconcile(orch, system.wwid)
    tables = {n: (d.live, None if d.regions is None else d.regions.copy()) for n, d in system.dm.devices.items()}
    system.volume.move_pages(0.1)
    system.volume.corrupt_next_map(kind, count=100)
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    for name, (live, regions) in tables.items():
        assert system.dm.devices[name].live == live
        if regions is not None:
            assert np.array_equal(system.dm.devices[name].regions, regions)
    lun = orch.luns[system.wwid]
    assert lun.state == "routed" and lun.last_error
    # Once the array answers properly again, routing catches up.
    system.volume.corruption = None
    reconcile(orch, system.wwid)
    assert system.misrouted_pages(top_name(system)) == 0 and orch.luns[system.wwid].failures == 0


def test_generation_churn_once_is_absorbed_by_a_restart(tmp_path):
    system, orch = make(tmp_path, layout="random", page_size_bytes=MiB)
    small_chunks(system)
    system.volume.corrupt_next_map("generation-churn", count=1)
    reconcile(orch, system.wwid)
    assert system.misrouted_pages(top_name(system)) == 0


def test_resize_builds_a_new_stack_and_swaps_the_top_device(tmp_path):
    system, orch = make(tmp_path, size_bytes=2 * 1024 * MiB)
    lun = reconcile(orch, system.wwid)
    old_switch = lun.stack.plan.switch_name
    system.resize(3 * 1024 * MiB)
    lun = reconcile(orch, system.wwid)
    assert lun.stack.plan.switch_name != old_switch and old_switch not in system.dm.devices
    top = system.dm.devices[top_name(system)]
    assert top.live[0][1] == 3 * 1024 * MiB // 512
    assert system.misrouted_pages(top_name(system)) == 0
    assert len([d for d in system.dm.devices.values() if d.uuid.startswith("SWAGENT-")]) == 5


def test_a_failed_build_removes_what_it_made_and_keeps_the_old_stack(tmp_path):
    system, orch = make(tmp_path, size_bytes=2 * 1024 * MiB)
    reconcile(orch, system.wwid)
    before = {n: d.live for n, d in system.dm.devices.items()}
    system.resize(3 * 1024 * MiB)
    system.dm.fail[("load", f"{top_name(system)}-sw")] = errno.ENOMEM
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    assert {n: d.live for n, d in system.dm.devices.items()} == before


def test_a_resize_the_paths_missed_is_rescanned_and_followed(tmp_path):
    system, orch = make(tmp_path)
    reconcile(orch, system.wwid)
    # The array shrank and grew back bigger while nobody rescanned (a daemon killed mid-resize).
    system.volume.resize(4 * 1024 * MiB)
    system.store.resize(4 * 1024 * MiB)
    lun = reconcile(orch, system.wwid)
    assert sorted(system.rescans) == sorted(system.paths)
    assert system.dm.devices[top_name(system)].live[0][1] == 4 * 1024 * MiB // 512
    assert system.misrouted_pages(top_name(system)) == 0 and lun.stack.plan.region_count == 256


def test_the_array_map_must_cover_the_lun(tmp_path):
    system, orch = make(tmp_path)
    lun = reconcile(orch, system.wwid)
    before = {n: d.live for n, d in system.dm.devices.items()}
    system.rescan_follows_array = False
    system.volume.resize(2 * 1024 * MiB)  # the array shrank; the paths still show 3 GiB after a rescan
    with pytest.raises(SwitchAgentError, match="need"):
        reconcile(orch, system.wwid)
    assert system.rescans and {n: d.live for n, d in system.dm.devices.items()} == before
    assert lun.state == "routed" and "need" in lun.last_error


def test_other_vendors_luns_are_left_alone(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "s")
    orch = Orchestrator(Config(arrays=(type(CONFIG.arrays[0])("OTHER", "ARRAY"),)), system)
    with pytest.raises(NotOurArrayError):
        reconcile(orch, system.wwid)
    assert system.wwid not in orch.luns
    assert not [d for d in system.dm.devices.values() if d.uuid.startswith("SWAGENT-")]


def test_unknown_lun(tmp_path):
    system, orch = make(tmp_path)
    with pytest.raises(LunNotFoundError):
        reconcile(orch, "36001405deadbeef")


def test_a_dead_path_is_reported_and_its_member_uses_the_others(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=1)
    system.paths["sdc"].broken = True  # member 1's only path
    lun = reconcile(orch, system.wwid)
    status = orch.status(lun).to_json()
    member1 = next(m for m in status["members"] if m["member_id"] == lun.stack.page_map.members[1].member_id)
    assert member1["paths"] == []  # no path answered as member 1
    assert any(p.device == "sdc" and not p.usable for p in lun.topology.paths)
    own, other = lun.stack.plan.leg_paths[1]
    assert own == () and len(other) == 2


def test_status_and_locate_agree_with_the_array(tmp_path):
    system, orch = make(tmp_path, layout="random")
    lun = reconcile(orch, system.wwid)
    status = orch.status(lun).to_json()
    assert status["state"] == "routed" and status["device"] == f"/dev/mapper/{top_name(system)}"
    assert sum(m["pages"] for m in status["members"]) == system.volume.total_pages
    rng = np.random.default_rng(3)
    for offset in rng.integers(0, system.volume.size_bytes, size=100):
        where = orch.locate(lun, int(offset)).to_json()
        owner = system.volume.owner_of_offset(int(offset))
        assert where["member"] == owner.name
        assert {system.member_of_dev(system.devs[p]) for p in where["paths"]} == {owner.number}
    assert orch.find(top_name(system)) is lun and orch.find(system.wwid) is lun
    with pytest.raises(ValueError):
        orch.locate(lun, system.volume.size_bytes)


def test_rejected_diff_message_falls_back_to_a_full_upload(tmp_path):
    system, orch = make(tmp_path, layout="random")
    lun = reconcile(orch, system.wwid)
    system.volume.move_pages(0.05)
    switch = system.dm.devices[lun.stack.plan.switch_name]
    real = system.dm.target_message
    calls = []

    def flaky(name, sector, message, **kw):
        calls.append(message)
        if len(calls) == 1:
            real(name, sector, message.split(" ")[0] + " " + message.split(" ")[1] + " zz:zz", **kw)
        return real(name, sector, message, **kw)

    system.dm.target_message = flaky
    reconcile(orch, system.wwid)
    assert switch.regions is not None
    assert system.misrouted_pages(top_name(system)) == 0


@pytest.mark.parametrize("crash", ["after-legs", "mid-upload", "before-swap", "routed"])
def test_a_restarted_daemon_adopts_what_the_last_one_left(tmp_path, crash):
    """kill -9 at any point, then a new daemon: one correct stack, no leaked devices."""
    system, orch = make(tmp_path, layout="random")
    reconcile(orch, system.wwid)
    wwid, top = system.wwid, top_name(system)
    dm = system.dm
    system.volume.move_pages(0.3)
    if crash != "routed":
        # What a dying daemon might have left of its next epoch.
        dm.device_create(f"{top}-leg0-2", f"SWAGENT-leg-0-2-{wwid}")
        if crash in ("mid-upload", "before-swap"):
            leg = dm.devices[f"{top}-leg0-2"]
            dm.table_load(leg.name, [(0, 10, "multipath", "0 0 1 1 round-robin 0 1 1 8:16 1")])
            dm.device_resume(leg.name)
            dm.device_create(f"{top}-sw2", f"SWAGENT-sw-2-{wwid}")
            dm.table_load(f"{top}-sw2", [(0, 10, "switch", f"1 1 0 {leg.dev} 0")])
            dm.device_resume(f"{top}-sw2")
        if crash == "before-swap":
            dm.table_load(top, [(0, 10, "linear", f"{dm.devices[f'{top}-sw2'].dev} 0")])
    fresh = Orchestrator(CONFIG, system)
    assert asyncio.run(fresh.adopt()) == [wwid]
    lun = reconcile(fresh, wwid)
    assert lun.epoch >= 2 and system.misrouted_pages(top) == 0
    ours = sorted(n for n, d in dm.devices.items() if d.uuid.startswith("SWAGENT-"))
    assert ours == sorted([top, lun.stack.plan.switch_name, *(leg.name for leg in lun.stack.plan.legs)])


def test_a_failed_path_whose_disk_is_gone_does_not_stop_the_heal_of_the_others(tmp_path):
    # Seen in the guest: a session logged out (its /dev/sdX removed) while its path was failed in a
    # leg; opening it raised, and the whole heal round of the LUN ended in "unexpected error".
    from agent.kernel.sgio import ScsiDeviceError
    system, orch = make(tmp_path, members=3, paths_per_member=2)
    lun = reconcile(orch, system.wwid)
    failed = []
    for plan_leg, own in zip(lun.stack.plan.legs[:2], lun.stack.plan.leg_paths[:2]):
        leg = system.dm.devices[plan_leg.name]
        system.dm.target_message(leg.name, 0, f"fail_path {own[0][0]}")
        failed.append((leg, own[0][0], next(n for n, d in system.devs.items() if d == own[0][0])))
    (_, gone_dev, gone_sd), (back_leg, back_dev, _) = failed
    real_open = system.open_path

    def open_path(device):
        if device == gone_sd:
            raise ScsiDeviceError(device, None, errno.ENOENT, "open")
        return real_open(device)

    system.open_path = open_path
    assert asyncio.run(orch.heal_paths(system.wwid)) == 1
    assert back_dev not in back_leg.failed and gone_dev in failed[0][0].failed


def test_failed_leg_paths_are_reinstated_once_they_answer_again(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=2)
    lun = reconcile(orch, system.wwid)
    leg = system.dm.devices[lun.stack.plan.legs[0].name]
    own = lun.stack.plan.leg_paths[0][0]
    sd = next(n for n, d in system.devs.items() if d == own[0])
    system.dm.target_message(leg.name, 0, f"fail_path {own[0]}")  # as dm-mpath does on an I/O error
    system.paths[sd].broken = True
    assert asyncio.run(orch.heal_paths(system.wwid)) == 1 and own[0] in leg.failed
    system.paths[sd].broken = False
    assert asyncio.run(orch.heal_paths(system.wwid)) == 0 and leg.failed == set()


def test_paths_coming_and_going_reload_the_legs_in_place(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=1, layout="random")
    lun = reconcile(orch, system.wwid)
    switch = system.dm.devices[lun.stack.plan.switch_name]
    regions = switch.regions
    built = len(system.dm.log)
    added = system.add_path(0)  # a second session to member m0
    lun = reconcile(orch, system.wwid)
    assert lun.epoch == 1 and system.dm.devices[lun.stack.plan.switch_name] is switch
    assert switch.regions is regions  # the switch was not reloaded
    assert len(lun.stack.plan.leg_paths[0][0]) == 2
    assert system.misrouted_pages(top_name(system)) == 0
    del system.paths[added], system.devs[added]  # and gone again
    lun = reconcile(orch, system.wwid)
    assert lun.epoch == 1 and len(lun.stack.plan.leg_paths[0][0]) == 1
    assert ("load", lun.stack.plan.switch_name) not in system.dm.log[built:]
    assert ("load", lun.stack.plan.legs[0].name) in system.dm.log[built:]


def test_a_leg_gaining_its_own_path_and_the_switch_go_before_the_other_legs_fallbacks(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=1, layout="random")
    lun = reconcile(orch, system.wwid)
    legs = [leg.name for leg in lun.stack.plan.legs]
    built = len(system.dm.log)
    system.add_path(1)  # member m1's new session (as after a join), and pages moved meanwhile
    system.volume.move_pages(0.2)
    lun = reconcile(orch, system.wwid)
    assert lun.epoch == 1 and system.misrouted_pages(top_name(system)) == 0
    done = [entry for entry in system.dm.log[built:] if entry[0] in ("load", "message")]
    switch = ("message", lun.stack.plan.switch_name)
    # m1's leg prefers the new path before the switch routes the moved pages; the others only
    # gain a fallback path, after it.
    assert done.index(("load", legs[1])) < done.index(switch) < done.index(("load", legs[0]))
    assert done.index(switch) < done.index(("load", legs[2]))
    assert done.count(("load", legs[1])) == 1


def test_a_new_disk_of_the_lun_joins_its_leg_before_multipathd_has_it(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=1, layout="random")
    lun = reconcile(orch, system.wwid)
    added = system.add_path(2)  # a member's session back: the kernel has the disk, multipathd not yet
    system.not_in_mpath.add(added)
    assert reconcile(orch, system.wwid).stack.plan.leg_paths[2][0] == (system.devs["sdd"],)  # not without the offer

    assert asyncio.run(orch.offer_path(added)) == system.wwid
    assert asyncio.run(orch.offer_path(added)) is None  # udev's event of the same disk: nothing new
    lun = reconcile(orch, system.wwid)
    assert lun.epoch == 1 and lun.stack.plan.leg_paths[2][0] == (system.devs["sdd"], system.devs[added])
    assert added in {p.device for p in lun.topology.paths}

    system.not_in_mpath.clear()  # multipathd caught up: a plain path, nothing reloaded
    loads = len(system.dm.log)
    assert len(reconcile(orch, system.wwid).stack.plan.leg_paths[2][0]) == 2
    assert system.dm.log[loads:] == [] and orch.discovery._new_paths == {}


def test_a_new_disk_is_not_taken_when_it_is_gone_or_shows_another_size(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=1, layout="random")
    reconcile(orch, system.wwid)
    gone, other_size = system.add_path(0), system.add_path(1)
    system.not_in_mpath |= {gone, other_size}
    assert asyncio.run(orch.offer_path(gone)) == asyncio.run(orch.offer_path(other_size)) == system.wwid
    del system.paths[gone]
    describe = system.describe_path

    async def mid_resize(device, luns=None):
        found = await describe(device, luns)
        return found and dataclasses.replace(found, size_sectors=found.size_sectors + 1)

    system.describe_path = mid_resize
    lun = reconcile(orch, system.wwid)
    assert {p.device for p in lun.topology.paths} == {"sdb", "sdc", "sdd"} and orch.discovery._new_paths == {}


def test_early_paths_off_leaves_new_disks_to_multipathd(tmp_path):
    system, orch = make(tmp_path, Config(early_paths=False), paths_per_member=1)
    reconcile(orch, system.wwid)
    added = system.add_path(1)
    system.not_in_mpath.add(added)
    assert asyncio.run(orch.offer_path(added)) is None
    assert added not in {p.device for p in reconcile(orch, system.wwid).topology.paths}
    assert config_from_mapping({"early_paths": False}).early_paths is False


def test_a_disk_of_another_lun_or_before_routing_is_not_offered(tmp_path):
    system, orch = make(tmp_path)
    assert asyncio.run(orch.offer_path("sdb")) is None  # not routed yet: multipathd's map brings it
    reconcile(orch, system.wwid)
    assert asyncio.run(orch.offer_path("sdb")) is None  # already a path
    assert asyncio.run(orch.offer_path("sdz")) is None  # no such disk
    other = system.add_path(0)
    describe = system.describe_path

    async def another_lun(device, luns=None):
        found = dataclasses.replace(await describe(device), wwid="36001405ffffffffffffffffffffffff")
        return found if luns is None or found.wwid in luns else None

    system.describe_path = another_lun
    assert asyncio.run(orch.offer_path(other)) is None


def test_status_warns_when_multipathds_map_lags_its_paths(tmp_path):
    system, orch = make(tmp_path, size_bytes=2 * 1024 * MiB)
    lun = reconcile(orch, system.wwid)
    assert orch.status(lun).to_json()["warnings"] == []
    system.resize(3 * 1024 * MiB)
    system.map_size_bytes = 2 * 1024 * MiB  # the array grew; nobody ran `multipathd resize map`
    lun = reconcile(orch, system.wwid)
    (warning,) = orch.status(lun).to_json()["warnings"]
    assert f"multipathd resize map {system.wwid}" in warning
    assert system.misrouted_pages(top_name(system)) == 0  # routing follows the paths regardless


def test_a_whole_map_is_encoded_off_the_event_loop(tmp_path, monkeypatch):
    """Seconds of encoding for a big map must not stall the other LUNs' events and the control socket."""
    import threading

    from agent import apply as orch_mod

    system, orch = make(tmp_path)
    real = orch_mod.dmswitch_encoder.encode_region_mappings
    threads = []

    def encode(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(orch_mod.dmswitch_encoder, "encode_region_mappings", encode)

    async def run():
        loop_thread = threading.get_ident()
        await orch.reconcile(system.wwid)
        return loop_thread

    loop_thread = asyncio.run(run())
    assert threads and loop_thread not in threads
    assert orch.luns[system.wwid].state == "routed"


def test_an_encoding_failure_on_first_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from agent import apply as orch_mod
    from protocol.errors import EncodeError

    system, orch = make(tmp_path)

    def encode(*args, **kwargs):
        raise EncodeError("no")

    monkeypatch.setattr(orch_mod.dmswitch_encoder, "encode_region_mappings", encode)
    with pytest.raises(EncodeError):
        reconcile(orch, system.wwid)
    assert [n for n, d in system.dm.devices.items() if d.uuid.startswith("SWAGENT-")] == []


def test_paths_are_asked_side_by_side(tmp_path):
    """After the first path named the array, the others' identify commands overlap (each has its own thread)."""
    system, orch = make(tmp_path, members=3, paths_per_member=2)
    in_flight, most = 0, 0

    def slow(execute):
        async def wrapped(*args, **kw):
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.01)
                return await execute(*args, **kw)
            finally:
                in_flight -= 1
        return wrapped

    for path in system.paths.values():
        path.execute = slow(path.execute)
    lun = reconcile(orch, system.wwid)
    assert [p.device for p in lun.topology.paths] == list(system.paths)  # in multipathd's order
    assert most >= 5


def test_heal_with_event_numbers_reads_only_the_legs_that_changed(tmp_path):
    system, orch = make(tmp_path, members=3, paths_per_member=2)
    lun = reconcile(orch, system.wwid)
    dm = system.dm
    legs = [leg.name for leg in lun.stack.plan.legs]

    def events():
        return {d.name: d.event_nr for d in dm.list_devices()}

    def statuses_during(coro):
        before = len(dm.log)
        result = asyncio.run(coro)
        return result, [name for op, name in dm.log[before:] if op == "status"]

    assert statuses_during(orch.heal_paths(system.wwid, events())) == (0, legs)  # first look: every leg
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (0, [])  # nothing moved: no ioctl
    own = lun.stack.plan.leg_paths[1][0]
    sd = next(n for n, d in system.devs.items() if d == own[0])
    dm.target_message(legs[1], 0, f"fail_path {own[0]}")  # bumps that leg's event_nr
    system.paths[sd].broken = True
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (1, [legs[1]])
    # Still failed: read again though its number has not moved since.
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (1, [legs[1]])
    system.paths[sd].broken = False
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (0, [legs[1]])
    assert own[0] not in dm.devices[legs[1]].failed
    # The reinstatement moved the number once more: one more read, then quiet.
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (0, [legs[1]])
    assert statuses_during(orch.heal_paths(system.wwid, events())) == (0, [])
    # Without numbers (a udev event, a retry) every leg is read.
    assert statuses_during(orch.heal_paths(system.wwid)) == (0, legs)


def test_a_lun_waiting_for_udev_on_its_new_top_device_frees_its_build_slot(tmp_path):
    system = ManyLunSystem(2, tmp_path=tmp_path, members=3, paths_per_member=1)
    orch = Orchestrator(Config(max_parallel_luns=1, max_message_bytes=4096), system)
    first, second = (s.wwid for s in system.systems)
    udev_done = threading.Event()
    resume = system.dm.device_resume

    def busy_udev(name=None, *, wait_for_udev=True, **kw):
        resume(name, wait_for_udev=wait_for_udev, **kw)
        if wait_for_udev and system.dm.device_info(name, uuid=kw.get("uuid")).name == f"switch-{first}":
            udev_done.wait(timeout=10)  # udev still busy with the first LUN's new node
    system.dm.device_resume = busy_udev

    async def main():
        # One thread in the loop's default pool: a udev wait held in it would stall every dm call.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        first_run = asyncio.create_task(orch.reconcile(first))
        deadline = time.monotonic() + 10
        while not (system.dm.devices.get(f"switch-{first}") and system.dm.devices[f"switch-{first}"].live):
            assert time.monotonic() < deadline, "the first LUN's top device never came"
            await asyncio.sleep(0.01)
        # Neither the only slot nor the only default thread is held through the first LUN's udev
        # wait: the second LUN builds meanwhile.
        lun = await asyncio.wait_for(orch.reconcile(second), timeout=5)
        assert lun.state == "routed" and system.systems[1].misrouted_pages(f"switch-{second}") == 0
        assert not first_run.done()
        # Its own lock is held until its device is there: a refresh of it waits for that.
        assert orch.luns[first].lock.locked()
        udev_done.set()
        assert (await first_run).state == "routed"

    asyncio.run(main())


def test_the_kernel_map_is_the_owners_array_not_a_copy(tmp_path):
    system, orch = make(tmp_path, layout="random")
    stack = reconcile(orch, system.wwid).stack
    assert stack.kernel_map is stack.page_map.owners and stack.kernel_map.dtype == np.int8
    with pytest.raises(ValueError):
        stack.kernel_map[0] = 0  # read-only: nothing may change one through the other


def test_a_failed_full_upload_after_a_failed_diff_leaves_the_next_reconcile_sending_everything(tmp_path):
    system, orch = make(tmp_path, layout="random")
    lun = reconcile(orch, system.wwid)
    old_owners = lun.stack.page_map.owners.copy()
    system.volume.move_pages(0.05)
    real = system.dm.target_message

    def broken(name, sector, message, **kw):
        raise DmIoctlError(DmCommand.TARGET_MSG, name, errno.EIO, "injected")

    system.dm.target_message = broken
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    assert np.array_equal(lun.stack.page_map.owners, old_owners)  # the old map is left as it was
    assert (lun.stack.kernel_map == -1).all()
    system.dm.target_message = real
    # Some messages of the failed uploads might have applied: the kernel's map is unknown.
    switch = system.dm.devices[lun.stack.plan.switch_name]
    switch.regions[:] = (switch.regions + 1) % 3
    reconcile(orch, system.wwid)
    assert system.misrouted_pages(top_name(system)) == 0


def test_whole_map_encodes_run_at_most_two_at_once(tmp_path, monkeypatch):
    from agent import apply as orchestrator_module
    from protocol import dmswitch_encoder

    system = ManyLunSystem(6, tmp_path=tmp_path, members=3, paths_per_member=1)
    orch = Orchestrator(Config(max_parallel_luns=6, max_message_bytes=4096), system)
    real = dmswitch_encoder.encode_region_mappings
    lock, running, most = threading.Lock(), [0], [0]
    # Three encodes meet here if they can; under the bound the two inside give up after the deadline.
    three_in = threading.Barrier(3, timeout=1)

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            with contextlib.suppress(threading.BrokenBarrierError):
                three_in.wait()
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(orchestrator_module.dmswitch_encoder, "encode_region_mappings", counting)

    async def main():
        return await asyncio.gather(*(orch.reconcile(s.wwid) for s in system.systems))

    assert all(lun.state == "routed" for lun in asyncio.run(main()))
    assert most[0] == 2  # two overlap, never a third


def test_a_member_leaving_the_map_carries_no_leg_and_no_fallback(tmp_path):
    """Its sessions are about to go: a leg table naming its disk would fail to load once they do."""
    system, orch = make(tmp_path, members=4, paths_per_member=1, layout="random")
    reconcile(orch, system.wwid)
    leaving = system.volume.members[-1].number
    leaving_dev = next(system.devs[n] for n, p in system.paths.items() if p.member_number == leaving)
    system.volume.remove_member(leaving)  # its pages go to the others; its port still answers
    lun = reconcile(orch, system.wwid)
    assert len(lun.stack.plan.legs) == 3
    assert all(leaving_dev not in own + other for own, other in lun.stack.plan.leg_paths)
    assert system.misrouted_pages(top_name(system)) == 0


def test_a_poll_round_runs_off_the_loop_and_falls_through_to_a_path_that_answers(tmp_path):
    system = ManyLunSystem(2, tmp_path=tmp_path)
    orch = Orchestrator(CONFIG, system)
    luns = [reconcile(orch, s.wwid) for s in system.systems]
    first, second = system.systems
    threads: set[str] = set()
    for s in system.systems:
        for path in s.paths.values():
            run_command = path.execute

            async def execute(cdb, *, _run=run_command, **kw):
                threads.add(threading.current_thread().name)
                return await _run(cdb, **kw)
            path.execute = execute
    broken = next(iter(first.paths.values()))
    broken.broken = True  # first LUN: its first path fails, the next one answers
    for path in second.paths.values():
        path.broken = True  # second LUN: no path answers
    before = broken.commands

    async def main() -> tuple[dict, str]:
        return await orch.poll_generations(luns), threading.current_thread().name

    generations, loop_thread = asyncio.run(main())
    assert generations == {first.wwid: luns[0].stack.page_map.generation, second.wwid: None}
    assert broken.commands == before + 1
    assert len(threads) == 1 and loop_thread not in threads


def test_an_upload_failing_part_way_counts_only_the_messages_the_kernel_took(tmp_path):
    # The upload runs in one worker hop: the counts still name exactly what was sent before the error.
    system, orch = make(tmp_path, Config(max_message_bytes=256), layout="random")  # 2 messages
    real = system.dm.target_message
    taken: list[str] = []

    def second_fails(name, sector, message, **kw):
        if len(taken) == 1:
            raise DmIoctlError(DmCommand.TARGET_MSG, name, errno.EIO, "injected")
        taken.append(message)
        return real(name, sector, message, **kw)

    system.dm.target_message = second_fails
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    lun = orch.luns[system.wwid]
    assert lun.messages_sent == 1 and lun.message_bytes_sent == sum(map(len, taken))
    system.dm.target_message = real
    lun = reconcile(orch, system.wwid)
    assert lun.state == "routed" and system.misrouted_pages(top_name(system)) == 0
