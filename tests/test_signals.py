"""Blinker signals: sent with the app as sender, carrying the documented arguments."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from blinker import Signal
from flask import Flask
from flask.testing import FlaskClient

from flask_bits import signals
from tests.conftest import assert_ack
from tests.conftest import cancel_session
from tests.conftest import close_session
from tests.conftest import create_session
from tests.conftest import send_fragment

PATH = "/bits/file.bin"
ALL = {
    "session-created": signals.session_created,
    "fragment-received": signals.fragment_received,
    "upload-completed": signals.upload_completed,
    "session-closed": signals.session_closed,
    "session-cancelled": signals.session_cancelled,
}

Event = tuple[str, dict[str, t.Any]]


class Recorder:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.events: list[Event] = []
        self._receivers: list[tuple[Signal, t.Callable[..., None]]] = []

    def connect(self) -> None:
        for name, signal in ALL.items():
            def receiver(sender: t.Any, _name: str = name, **kwargs: t.Any) -> None:
                assert sender is self.app
                self.events.append((_name, kwargs))

            signal.connect(receiver, self.app)
            self._receivers.append((signal, receiver))

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


@pytest.fixture
def recorder(app: Flask) -> t.Iterator[Recorder]:
    rec = Recorder(app)
    rec.connect()
    yield rec
    rec.disconnect()


def assert_event(event: Event, name: str, **expected: t.Any) -> None:
    """``event`` is ``name`` and carries at least ``expected`` (plus ``directory``)."""
    assert event[0] == name
    expected.setdefault("directory", "bits")
    assert {k: event[1].get(k) for k in expected} == expected, event


def test_signals_of_a_full_upload(client: FlaskClient, recorder: Recorder) -> None:
    sid = create_session(client, PATH)
    assert recorder.names() == ["session-created"]
    assert_event(recorder.events[0], "session-created", session_id=sid, remote_path="file.bin",
                 owner=None)
    assert_ack(send_fragment(client, PATH, sid, b"abcd", 0, 10), 200)
    assert_ack(send_fragment(client, PATH, sid, b"XXefgh", 2, 10), 200)  # 2 bytes overlap
    assert recorder.names()[1:] == ["fragment-received", "fragment-received"]
    assert_event(recorder.events[1], "fragment-received", session_id=sid, received=4, total=10)
    assert_event(recorder.events[2], "fragment-received", session_id=sid, received=8, total=10)
    assert_ack(send_fragment(client, PATH, sid, b"ij", 8, 10), 200)
    # The completing fragment reports its progress too, before the completion.
    assert recorder.names()[3:5] == ["fragment-received", "upload-completed"]
    assert_event(recorder.events[3], "fragment-received", session_id=sid, received=10, total=10)
    completed = [e for e in recorder.events if e[0] == "upload-completed"]
    assert len(completed) == 1
    assert_event(completed[0], "upload-completed", session_id=sid, remote_path="file.bin",
                 size=10, owner=None)
    count = len(recorder.events)
    assert_ack(send_fragment(client, PATH, sid, b"ij", 8, 10), 200)  # a retry: no new event
    assert len(recorder.events) == count
    assert_ack(close_session(client, PATH, sid), 200)
    assert_event(recorder.events[-1], "session-closed", session_id=sid, completed=True)
    assert_ack(close_session(client, PATH, sid), 200)  # repeated: no new event
    assert recorder.names().count("session-closed") == 1


def test_signals_of_an_incomplete_close(client: FlaskClient, recorder: Recorder) -> None:
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, b"abcd", 0, 10), 200)
    assert_ack(close_session(client, PATH, sid), 200)
    assert recorder.names() == ["session-created", "fragment-received", "session-closed"]
    assert_event(recorder.events[-1], "session-closed", session_id=sid, completed=False)


def test_signals_of_an_empty_file_close(
    client: FlaskClient, recorder: Recorder, upload_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(close_session(client, PATH, sid), 200)
    assert recorder.names() == ["session-created", "upload-completed", "session-closed"]
    assert_event(recorder.events[1], "upload-completed", session_id=sid, size=0)
    assert_event(recorder.events[2], "session-closed", session_id=sid, completed=True)
    assert (upload_folder / "file.bin").read_bytes() == b""


def test_signals_of_a_cancel(client: FlaskClient, recorder: Recorder) -> None:
    sid = create_session(client, PATH)
    assert_ack(cancel_session(client, PATH, sid), 200)
    assert_ack(cancel_session(client, PATH, sid), 200)
    assert recorder.names() == ["session-created", "session-cancelled"]
    assert_event(recorder.events[-1], "session-cancelled", session_id=sid)


def test_no_signals_for_refused_packets(client: FlaskClient, recorder: Recorder) -> None:
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, b"abcd", 5, 10), 416)
    assert_ack(send_fragment(client, PATH, "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}",
                             b"abcd", 0, 10), 500, "0x8020001F")
    assert recorder.names() == ["session-created"]


def test_signals_are_scoped_to_their_app(
    tmp_path: Path, recorder: Recorder, client: FlaskClient
) -> None:
    other = Flask("other", instance_path=str(tmp_path / "other"))
    other.config.update(BITS_CLEANUP_INTERVAL=0)
    from flask_bits import BITS

    BITS(other)
    create_session(other.test_client(), PATH)
    assert recorder.events == []
    create_session(client, PATH)
    assert recorder.names() == ["session-created"]


def test_signal_names_of_the_module() -> None:
    assert set(signals.BY_EVENT) >= set(ALL)
    for name, signal in ALL.items():
        assert signals.BY_EVENT[name] is signal
        assert signal.name == name


def test_an_operator_cancel_signals_like_a_client_cancel(
    app: Flask, client: FlaskClient, recorder: Recorder
) -> None:
    sid = create_session(client, PATH)
    result = app.test_cli_runner().invoke(args=["bits", "cancel", sid])
    assert result.exit_code == 0, result.output
    assert recorder.names() == ["session-created", "session-cancelled"]
    assert_event(recorder.events[-1], "session-cancelled", session_id=sid)
