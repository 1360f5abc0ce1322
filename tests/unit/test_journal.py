"""journald native protocol: structured fields reach a real unix datagram socket."""

import socket
import struct

from services.runtime.logs import encode_journal, journal_field


def parse(datagram: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            fields[line.decode()] = datagram[nl + 9 : nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return fields


def test_fields_priority_and_multiline_values(tmp_path):
    path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    event = {
        "event": "dead-lettered",
        "level": "warning",
        "camera": "front_door",
        "file_id": "abc",
        "reason": "line one\nline two",
        "timestamp": "t",
    }
    client.sendto(encode_journal(event, "vigil-detector"), str(path))
    fields = parse(server.recv(65536))
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "vigil-detector"
    assert fields["CAMERA"] == "front_door" and fields["FILE_ID"] == "abc"
    assert fields["REASON"] == "line one\nline two"
    assert fields["MESSAGE"].startswith("dead-lettered camera=front_door")
    assert "TIMESTAMP" not in fields


def test_field_names_are_journal_safe():
    assert journal_field("event_id") == "EVENT_ID"
    assert journal_field("_private-thing") == "PRIVATE_THING"
    assert journal_field("message") == "VIGIL_MESSAGE"


def test_structlog_drives_the_journal_logger(tmp_path, monkeypatch):
    """configure_logging('journal') sends every call, with its keys as fields, to the journal socket."""
    import structlog

    from services.runtime import logs

    path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(path))
    log = logs.configure_logging("watcher", "journal", "info")
    log.warning("skipped", camera="backyard", path="backyard/x.jpg")
    fields = parse(server.recv(65536))
    structlog.reset_defaults()
    assert (
        fields["SYSLOG_IDENTIFIER"] == "vigil-watcher" and fields["CAMERA"] == "backyard" and fields["PRIORITY"] == "4"
    )
    assert fields["SERVICE"] == "watcher"
