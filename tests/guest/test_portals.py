"""Member portals in the real kernel: one group login, and the array says where every member is.

Runs inside the VM rig after a login to member 0's portal only:

    python -m tests.vm.run --members 3 --login first -- \\
        python -m pytest -q -s tests/guest/test_portals.py

Per case: the host starts with exactly one session; VPD 0xC1 read through
that one path (sg3_utils' raw bytes decoded by protocol/portals.py, and the
agent's own reader over SG_IO) lists all three members' portals; SendTargets
discovery lists the same portals with their portal group tags (its output is
kept in the results directory as sendtargets.txt, the format iscsiadm gives
the session manager); the page follows add-member / remove-member; and with
the array brought up again with CHAP required, a login without credentials
or with wrong ones fails, and with them succeeds. The CHAP case runs last:
it replaces the rig's array.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from agent import portals as agent_portals
from agent.kernel.sgio import ScsiDevice
from protocol import portals, scsi
from tests.array import initiator
from tests.guest.agentlib import RESULTS, skip_unless_emulated_array_rig

pytestmark = pytest.mark.guest

if os.environ.get("SWITCH_AGENT_LOGIN") != "first":
    pytest.skip("needs the rig's --login first", allow_module_level=True)

MEMBERS = int(os.environ.get("SWITCH_AGENT_MEMBERS", "3"))


@pytest.fixture(scope="module", autouse=True)
def _rig() -> None:
    skip_unless_emulated_array_rig()


def run(*argv: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    print(f"$ {' '.join(argv)}  -> {result.returncode}\n{result.stdout}{result.stderr}", flush=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def array(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "tests.array", *args, check=check)


def info() -> dict:
    return json.loads(array("info", "--json").stdout)


def only_path(iqn: str) -> str:
    sessions = initiator.sessions(iqn)
    assert [(s.tpgt, s.address) for s in sessions] == [(1, "127.0.0.1")], sessions
    assert len(sessions[0].devices) == 1
    return f"/dev/{sessions[0].devices[0]}"


def listed(members) -> list[tuple[int, int, str, int, int]]:
    return [(m.member_id, m.target_port_group, p.iscsiadm_portal, p.portal_group_tag,
             p.relative_target_port) for m in members for p in m.portals]


def expected_members(state: dict) -> list[tuple[int, int, str, int, int]]:
    return [(m["member_id"], m["member_id"], m["portal"], m["tpg_tag"], m["number"] + 1)
            for m in state["members"]]


def raw_vpd(device: str, page: int) -> bytes:
    """The page as sg3_utils reads it: an independent reader of the same bytes."""
    out = subprocess.run(["sg_vpd", f"--page={page:#x}", "--raw", device], capture_output=True,
                         timeout=60, check=True, stdin=subprocess.DEVNULL)
    return out.stdout


def read_with_agent(device: str) -> tuple[portals.MemberPortals, ...] | None:
    async def read():
        path = ScsiDevice(device)
        try:
            return await agent_portals.read_member_portals(path)
        finally:
            path.close()
    return asyncio.run(read())


def test_group_login_leaves_one_session_and_one_path() -> None:
    state = info()
    assert len(state["members"]) == MEMBERS
    only_path(state["iqn"])
    assert [len(m["paths"]) for m in state["members"]] == [1] + [0] * (MEMBERS - 1)


def test_one_path_tells_every_members_portal() -> None:
    state = info()
    device = only_path(state["iqn"])
    supported = scsi.decode_supported_vpd_pages(raw_vpd(device, 0x00)).page_codes
    assert portals.MEMBER_PORTALS_VPD in supported
    page = portals.decode_member_portals_vpd(raw_vpd(device, portals.MEMBER_PORTALS_VPD))
    assert listed(page.members) == expected_members(state)
    assert page.generation == state["generation"]
    assert read_with_agent(device) == page.members
    # sg_inq's view for the record (it prints an unknown vendor page in hex).
    shown = run("sg_inq", "-p", "0xc1", device, check=False)
    (RESULTS / "sg_inq_0xc1.txt").write_text(f"$ sg_inq -p 0xc1 {device}  -> {shown.returncode}\n"
                                             f"{shown.stdout}{shown.stderr}")


def test_sendtargets_lists_the_same_portals_with_their_tags() -> None:
    state = info()
    out = run("iscsiadm", "-m", "discovery", "-t", "st", "-p", "127.0.0.1").stdout
    (RESULTS / "sendtargets.txt").write_text(out)
    records = agent_portals.parse_sendtargets(out)
    assert sorted((r.address, r.port, r.tpgt, r.target) for r in records) == sorted(
        (m["portal"].split(":")[0], 3260, m["tpg_tag"], state["iqn"]) for m in state["members"])
    # The referrals-array rule over the same portals: the one path observed tag 1's port.
    device = only_path(state["iqn"])
    ids = scsi.decode_device_identification_vpd(raw_vpd(device, 0x83))
    page = portals.decode_member_portals_vpd(raw_vpd(device, portals.MEMBER_PORTALS_VPD))
    groups = {m.target_port_group: [p.relative_target_port for p in m.portals] for m in page.members}
    match = agent_portals.match_sendtargets(records, state["iqn"], groups,
                                            observed={1: ids.relative_target_port_id()})
    assert match.unmatched == () and match.members == page.members


def test_the_page_follows_add_member_and_remove_member() -> None:
    before = info()
    device = only_path(before["iqn"])
    added = json.loads(array("add-member", "--json").stdout)
    grown = portals.decode_member_portals_vpd(raw_vpd(device, portals.MEMBER_PORTALS_VPD))
    assert listed(grown.members) == expected_members(info())
    assert listed(grown.members)[-1][2] == f"127.0.0.{added['number'] + 1}:3260"
    assert grown.generation > before["generation"]
    array("remove-member", str(added["number"]))
    shrunk = portals.decode_member_portals_vpd(raw_vpd(device, portals.MEMBER_PORTALS_VPD))
    assert listed(shrunk.members) == expected_members(before)
    assert shrunk.generation > grown.generation


def test_chap_required_refuses_a_login_without_the_right_credentials(tmp_path) -> None:
    state = info()
    right, wrong = tmp_path / "chap", tmp_path / "wrong"
    right.write_text("swagent-host:chap-secret-0123\n")
    wrong.write_text("swagent-host:not-the-secret\n")
    array("down")
    array("up", "--members", "2", "--size", str(state["size_bytes"]),
          "--page-size", str(state["page_size_bytes"]), "--chap-file", str(right))
    iqn = info()["iqn"]
    for credentials in ([], ["--chap-file", str(wrong)]):
        refused = array("login", "--member", "0", *credentials, check=False)
        assert refused.returncode != 0
        assert "authoriz" in refused.stderr.lower() or "auth" in refused.stderr.lower(), refused.stderr
        assert initiator.sessions(iqn) == []
    array("login", "--member", "0", "--chap-file", str(right))
    sessions = initiator.sessions(iqn)
    assert [(s.tpgt, bool(s.devices)) for s in sessions] == [(1, True)]
    # The secret went into the node record, not into the emulator's info.
    assert "chap-secret" not in json.dumps(info())
