"""The emulated array's optional CHAP: parsing, LIO's TPG settings, the initiator's node records, the CLI."""

from __future__ import annotations

import sys
import types

import pytest

from tests.array import cli, initiator, lio, server
from tests.array.errors import EmulatorError, LioError

MIB = 1 << 20


def test_parse_chap_splits_at_the_first_colon_and_hides_the_secret():
    chap = lio.parse_chap("alice:se:cret-12345\n")
    assert (chap.userid, chap.password) == ("alice", "se:cret-12345")
    assert "se:cret" not in repr(chap) and "13 characters" in repr(chap)


@pytest.mark.parametrize("text", ["alice", "alice:", ":secret", "al ice:secret", "alice:sec ret",
                                  "alice:s\u00e9cret", "alice:" + "x" * 256])
def test_parse_chap_refuses(text):
    with pytest.raises(LioError) as info:
        lio.parse_chap(text)
    password = text.partition(":")[2]
    assert "USER:PASSWORD" in str(info.value)
    assert not password or password not in str(info.value)  # the error never echoes a secret


class FakeTpg:
    def __init__(self, target, tag, mode):
        self.tag, self.attributes, self.events = tag, {}, []
        target.tpgs.append(self)

    def set_attribute(self, name, value):
        self.attributes[name] = value
        self.events.append(("attribute", name, value))

    def __setattr__(self, name, value):
        if name.startswith("chap_") or name == "enable":
            self.events.append((name, value))
        object.__setattr__(self, name, value)


def fake_rtslib() -> types.ModuleType:
    """Just the rtslib_fb calls LioArray.add_member makes, recorded (the host has no configfs)."""
    rts = types.ModuleType("rtslib_fb")
    rts.RTSLibError = RuntimeError
    rts.FabricModule = lambda name: name
    rts.Target = lambda fabric, iqn, mode: types.SimpleNamespace(tpgs=[])
    rts.UserBackedStorageObject = lambda *a, **k: object()
    rts.TPG = FakeTpg
    rts.NetworkPortal = lambda *a, **k: None
    rts.LUN = lambda *a, **k: None
    return rts


@pytest.mark.parametrize("chap", [None, lio.Chap("alice", "secret-12345")])
def test_add_member_requires_chap_on_the_tpg_only_when_asked(chap, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake_rtslib())
    monkeypatch.setattr(lio, "Path", lambda p: tmp_path / "etc-target")  # LioArray mkdirs its dbroot
    array = lio.LioArray(serial="s", chap=chap)
    array.create_target()
    array.add_member(0, 64 * MIB)
    tpg = array._target.tpgs[0]
    if chap is None:
        assert tpg.attributes["authentication"] == 0
        assert not [e for e in tpg.events if e[0].startswith("chap_")]
    else:
        assert tpg.attributes["authentication"] == 1 and tpg.attributes["generate_node_acls"] == 1
        # Credentials and authentication=1 before the TPG is enabled: no window without CHAP.
        order = [e[0] if e[0] != "attribute" else e[1] for e in tpg.events]
        assert order.index("chap_userid") < order.index("enable")
        assert order.index("chap_password") < order.index("enable")
        assert max(i for i, e in enumerate(tpg.events) if e[:2] == ("attribute", "authentication")) \
            < order.index("enable")
        assert (tpg.chap_userid, tpg.chap_password) == ("alice", "secret-12345")


def test_node_settings_add_chap_to_the_node_record_only_when_given():
    assert initiator.node_settings() == [("node.session.timeo.replacement_timeout", "5")]
    assert initiator.node_settings(lio.Chap("alice", "secret-12345"))[1:] == [
        ("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", "alice"),
        ("node.session.auth.password", "secret-12345")]


def test_cli_reads_chap_from_its_option_or_a_file(tmp_path):
    parser = cli.build_parser()
    assert cli._chap(parser.parse_args(["up"])) is None
    assert cli._chap(parser.parse_args(["up", "--chap", "alice:secret-12345"])) == lio.Chap("alice", "secret-12345")
    path = tmp_path / "chap"
    path.write_text("bob:other-secret\n")
    assert cli._chap(parser.parse_args(["login", "--chap-file", str(path)])) == lio.Chap("bob", "other-secret")
    with pytest.raises(EmulatorError):
        cli._chap(parser.parse_args(["login", "--chap-file", str(tmp_path / "missing")]))
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--chap", "a:b", "--chap-file", str(path)])


def test_server_hands_chap_to_lio_and_info_names_only_the_user(tmp_path, monkeypatch):
    made = {}

    class RecordingLio:
        iqn = lio.DEFAULT_IQN

        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(server, "LioArray", RecordingLio)
    monkeypatch.setenv("SWEMU_DATA_DIR", str(tmp_path / "data"))
    chap = lio.Chap("alice", "secret-12345")
    s = server.ArrayServer(server.ServerConfig(run_dir=tmp_path, members=2, layout="striped",
                                               size_bytes=8 * MIB, page_size_bytes=MIB, seed=0, chap=chap,
                                               member_portals=False))
    try:
        assert made["chap"] == chap
        info = s._op_info()
        assert info["chap_user"] == "alice" and "secret-12345" not in repr(info)
        assert info["member_portals"] is False and s.lu.member_portals is False
    finally:
        s.close()
