"""The emulated array with several LUNs (`up --luns N`): each its own identity, map and data; LUN 0 is driven."""

from __future__ import annotations

import pytest

from protocol import pagemap, scsi
from tests.array import cli, lio, server
from tests.array.errors import ArrayStateError

MIB = 1 << 20


class FakeLio:
    """Records what the server asks of LIO (the host has no configfs)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.iqn = lio.DEFAULT_IQN

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


@pytest.fixture
def make_server(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "LioArray", FakeLio)
    monkeypatch.setenv("SWEMU_DATA_DIR", str(tmp_path / "data"))
    made = []

    def make(luns: int) -> server.ArrayServer:
        s = server.ArrayServer(server.ServerConfig(run_dir=tmp_path, members=3, layout="seed",
                                                   size_bytes=64 * MIB, page_size_bytes=MIB, seed=0, luns=luns))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class Cmd:
    """Just enough of a RingCommand for _execute (no data-out)."""

    def __init__(self, cdb: bytes) -> None:
        self.cdb = cdb

    def gather(self) -> bytes:  # pragma: no cover - data-in commands only here
        return b""


def inquiry_serial(srv: server.ArrayServer, lu=None) -> str:
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=0x80, allocation_length_bytes=255)
    done = srv._execute(0, Cmd(cdb), lu)  # type: ignore[arg-type]
    assert done.status == scsi.ScsiStatus.GOOD
    return bytes(done.data_in)[4:].decode().strip("\0 ")


def test_one_lun_is_the_default_and_keeps_big_rings(make_server) -> None:
    srv = make_server(1)
    assert srv.extra_luns == []
    assert srv.lio.kwargs["control"] == lio.CONTROL
    assert [lun["lun"] for lun in srv._op_info()["luns"]] == [0]


def test_extra_luns_have_their_own_identity_map_and_store(make_server) -> None:
    srv = make_server(4)
    info = srv._op_info()
    wwids = [lun["wwid"] for lun in info["luns"]]
    assert [lun["volume"] for lun in info["luns"]] == ["vol0", "vol1", "vol2", "vol3"]
    assert len(set(wwids)) == 4 and wwids[0] == info["wwid"]
    serials = {inquiry_serial(srv)} | {inquiry_serial(srv, e.lu) for e in srv.extra_luns}
    assert len(serials) == 4
    # Different seeds: not four copies of one map.
    assert any((e.volume.owners != srv.volume.owners).any() for e in srv.extra_luns)
    assert len({str(e.store.directory) for e in srv.extra_luns} | {str(srv.store.directory)}) == 4
    # Many backstores: the small command ring.
    assert "cmd_ring_size_mb=1" in srv.lio.kwargs["control"]


def test_page_map_of_an_extra_lun_is_its_own(make_server) -> None:
    srv = make_server(2)
    extra = srv.extra_luns[0]
    cdb = pagemap.build_get_page_map_cdb(0, 1 << 16)
    done = srv._execute(1, Cmd(cdb), extra.lu)  # type: ignore[arg-type]
    decoded = pagemap.decode_page_map_response(bytes(done.data_in))
    assembler = pagemap.PageMapAssembler()
    assembler.add(decoded)
    assert (assembler.result().owners == extra.volume.owners).all()


def test_member_and_size_changes_refused_with_several_luns(make_server) -> None:
    srv = make_server(2)
    for op in (lambda: srv._op_resize(128 * MIB), srv._op_add_member, lambda: srv._op_retire_member(1)):
        with pytest.raises(ArrayStateError, match="one LUN only"):
            op()
    # Moving LUN 0's pages is still allowed.
    assert srv._op_move(0.1)["moved_pages"] > 0


def test_cli_add_member_empty_and_move_to() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["add-member", "--empty"]).empty is True
    assert parser.parse_args(["add-member"]).empty is False
    args = parser.parse_args(["move", "--fraction", "0.25", "--to", "3"])
    assert (args.fraction, args.to) == (0.25, 3)
    assert parser.parse_args(["move", "--fraction", "0.25"]).to is None


def test_add_member_empty_then_move_to_it_over_the_control_ops(make_server) -> None:
    srv = make_server(1)
    before = srv.volume.owners.copy()
    srv._op_add_member(empty=True)  # the LIO part is deferred work, not run here
    assert [m.number for m in srv.volume.members] == [0, 1, 2, 3]
    assert (srv.volume.owners == before).all()
    moved = srv._op_move(0.25, to=3)
    assert moved["moved_pages"] == round(0.25 * before.size) == int((srv.volume.owners == 3).sum())


def test_zero_luns_refused(make_server) -> None:
    with pytest.raises(ArrayStateError):
        make_server(0)


def test_cli_luns_flag() -> None:
    args = cli.build_parser().parse_args(["up", "--luns", "64"])
    assert args.luns == 64
    assert cli.build_parser().parse_args(["up"]).luns == 1
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["up", "--luns", "0"])


@pytest.mark.parametrize("name, ours", [("vol0_m0", True), ("vol17_m2", True), ("vol1_m", False),
                                        ("other_m0", False), ("vol1_m0x", False)])
def test_leftover_names(name, ours) -> None:
    assert bool(name.startswith("vol0_m") or lio._EXTRA_VOLUME.fullmatch(name)) == ours


def test_deleting_a_target_and_its_storage_spares_everything_else():
    from types import SimpleNamespace

    from tests.array.lio import delete_target_and_storage

    gone = []

    def thing(**kw):
        obj = SimpleNamespace(**kw)
        obj.delete = lambda: gone.append(kw.get("wwn") or kw["name"])
        return obj

    root = SimpleNamespace(targets=[thing(wwn="iqn.ours"), thing(wwn="iqn.someone-elses")],
                           storage_objects=[thing(name="vol0_m0"), thing(name="their_disk")])
    deleted = delete_target_and_storage(root, "iqn.ours", lambda s: s.name.startswith("vol0_"))
    assert deleted == ["target iqn.ours", "backstore vol0_m0"] and gone == ["iqn.ours", "vol0_m0"]
