"""For mypy, not pytest: each fake is assigned to the protocol it stands in for.

The pipeline's host tests run the agent over these fakes; if a fake drifts
from the System, PollablePath, SyncDeviceMapper, MapSource or iscsiadm Runner protocol the
agent declares, the tests would be testing something else. `mypy` (in CI,
tests/run.sh) checks these assignments.
"""

from __future__ import annotations

from agent.dm_async import SyncDeviceMapper
from agent.kernel.iscsi import Runner
from agent.mapsources.base import MapSource
from agent.mapsources.pagemap import PageMapSource
from agent.mapsources.referrals import ReferralsSource
from agent.orchestrator import System
from agent.scsipath import PollablePath, ScsiPath
from tests.unit.fakes_iscsi import FakeIscsiadm
from tests.unit.fakes_kernel import FakeArrayPath, FakeDeviceMapper, FakeSystem, ManyLunSystem
from tests.unit.fakes_referrals import FakeLioPath, FakeLioSystem


def system(fake: FakeSystem) -> System:
    return fake


def many_luns(fake: ManyLunSystem) -> System:
    return fake


def lio_system(fake: FakeLioSystem) -> System:
    return fake


def array_path(fake: FakeArrayPath) -> PollablePath:
    return fake


def lio_path(fake: FakeLioPath) -> PollablePath:
    return fake


def blocking_array_path(fake: FakeArrayPath) -> ScsiPath:
    return fake.blocking()


def device_mapper(fake: FakeDeviceMapper) -> SyncDeviceMapper:
    return fake


def iscsiadm_runner(fake: FakeIscsiadm) -> Runner:
    return fake


def sources(a: PageMapSource, b: ReferralsSource) -> tuple[MapSource, MapSource]:
    return a, b
