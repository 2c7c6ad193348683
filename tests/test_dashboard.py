"""The live view (flask_bits.dashboard): protection, the JSON endpoint, Cancel, and the
page itself in a real headless Chromium against gunicorn.

The browser test drives Debian's chromium through the DevTools protocol (a websocket on
127.0.0.1, read from ``DevToolsActivePort``); ``.ci/install-chromium`` installs it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask import Flask
from flask import Response

from example_app import create_app
from example_app.dashboard import register_dashboard
from flask_bits.dashboard import BITSDashboard
from flask_bits.dashboard import make_dashboard_blueprint
from tests import wire
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.servers import ROOT
from tests.servers import GunicornServer

ADMIN = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-pw").decode()}
ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode()}
BOB = {"Authorization": "Basic " + base64.b64encode(b"bob:bob-pw").decode()}
SESSION_NOT_FOUND = "0x8020001F"


def same_origin(client_base: str = "http://localhost") -> dict[str, str]:
    """What the page's fetch() sends with a Cancel."""
    return {**ADMIN, "X-BITS-Dashboard": "1", "Origin": client_base,
            "Sec-Fetch-Site": "same-origin"}


@pytest.fixture
def example(tmp_path: Path) -> Flask:
    """The example app with both directories, Basic auth for uploads and the dashboard."""
    app = create_app({
        "TESTING": True,
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_CLEANUP_INTERVAL": 0,
        "EXAMPLE_AUTH": "basic",
        "EXAMPLE_DASHBOARD": "1",
    })
    assert register_dashboard(app) is app.extensions["bits_dashboard"]
    return app


# -- protection ---------------------------------------------------------------------------


def test_refuses_to_exist_unprotected(make_app: t.Callable[..., Flask]) -> None:
    with pytest.raises(ValueError, match="authorize"):
        make_dashboard_blueprint()
    app = make_app()
    with pytest.raises(ValueError, match="allow_unprotected=True"):
        BITSDashboard(app)
    assert "bits_dashboard" not in app.extensions
    assert not any(r.rule.startswith("/bits-admin") for r in app.url_map.iter_rules())
    # Said explicitly, it is allowed (something in front of the app protects it).
    BITSDashboard(app, allow_unprotected=True)
    assert app.test_client().get("/bits-admin/sessions.json").status_code == 200


def test_every_route_needs_credentials(example: Flask) -> None:
    client = example.test_client()
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:nope").decode()}
    for headers in ({}, wrong, ALICE):
        for method, url in (("GET", "/bits-admin/"), ("GET", "/bits-admin/sessions.json"),
                            ("GET", "/bits-admin/static/dashboard.js"),
                            ("POST", "/bits-admin/sessions/{X}/cancel")):
            response = client.open(url, method=method, headers=headers)
            assert response.status_code == 401, (method, url, headers)
            assert response.headers["WWW-Authenticate"].startswith("Basic ")
    assert client.get("/bits-admin/", headers=ADMIN).status_code == 200
    with client.get("/bits-admin/static/dashboard.css", headers=ADMIN) as response:
        assert response.status_code == 200
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_authorize_false_is_403_and_true_must_be_true(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()
    BITSDashboard(app, url_prefix="/a", authorize=lambda request: False)
    app.register_blueprint(make_dashboard_blueprint(authorize=lambda request: None,  # type: ignore
                                                    name="b"), url_prefix="/b")
    app.register_blueprint(make_dashboard_blueprint(
        authorize=lambda request: Response("go away", 418), name="c"), url_prefix="/c")
    client = app.test_client()
    assert client.get("/a/sessions.json").status_code == 403
    assert client.get("/b/sessions.json").status_code == 403  # None is not a yes
    assert client.get("/c/sessions.json").status_code == 418


def test_example_dashboard_is_off_unless_asked(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXAMPLE_DASHBOARD", raising=False)
    app = create_app({"BITS_UPLOAD_FOLDER": str(tmp_path / "u"),
                      "BITS_SESSION_FOLDER": str(tmp_path / "s")})
    assert register_dashboard(app) is None
    assert app.test_client().get("/bits-admin/", headers=ADMIN).status_code == 404


# -- the JSON endpoint and the page ---------------------------------------------------------


def test_json_lists_the_sessions_of_every_directory(example: Flask) -> None:
    client = example.test_client()
    sid = create_session(client, "/bits/big.iso", headers=ALICE)
    assert_ack(send_fragment(client, "/bits/big.iso", sid, b"x" * 300, 0, 1000,
                             headers=ALICE), 200)
    fresh = create_session(client, "/bits/new.txt", headers=BOB)
    rsid = create_session(client, "/reply/fw.bin", headers=BOB)
    reply = assert_ack(send_fragment(client, "/reply/fw.bin", rsid, b"abcd", 0, 4,
                                     headers=BOB), 200)
    token = reply.headers["BITS-Reply-URL"].rsplit("/", 1)[-1]

    response = client.get("/bits-admin/sessions.json", headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    data = response.get_json()
    assert data["count"] == 3 and not data["truncated"] and data["errors"] == []
    assert data["directories"] == ["bits", "reply"]
    assert data["now"] == pytest.approx(time.time(), abs=60)
    rows = {row["id"]: row for row in data["sessions"]}
    assert [row["id"] for row in data["sessions"]] == [sid, fresh, rsid]  # oldest first

    big = rows[sid]
    assert (big["directory"], big["remote_path"], big["owner"]) == ("bits", "big.iso", "alice")
    assert (big["received"], big["total"], big["progress"]) == (300, 1000, 0.3)
    assert big["phase"] == "receiving" and big["reply"] is None
    assert big["idle"] >= 0 and big["age"] >= big["idle"]
    assert rows[fresh]["total"] is None and rows[fresh]["progress"] is None
    assert rows[fresh]["received"] == 0 and rows[fresh]["owner"] == "bob"
    assert rows[rsid]["directory"] == "reply" and rows[rsid]["phase"] == "finished"
    assert rows[rsid]["reply"] == "replied"
    # The reply URL's secret never reaches the page.
    assert token not in response.get_data(as_text=True)


def test_page_is_server_rendered_and_escaped(example: Flask) -> None:
    client = example.test_client()
    sid = create_session(client, "/bits/it's%20%26%20co.bin", headers=ALICE)
    response = client.get("/bits-admin/", headers=ADMIN)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert f'data-session-id="{sid}"' in html
    assert "it&#39;s &amp; co.bin" in html and "it's & co" not in html
    assert 'src="/bits-admin/static/dashboard.js"' in html
    assert "<script>" not in html  # no inline script: the CSP forbids it
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    empty = example.test_client()
    assert bits_post(empty, "/bits/it's%20%26%20co.bin", "Cancel-Session", session_id=sid,
                     headers=ALICE).status_code == 200
    assert "No open upload sessions." in empty.get(
        "/bits-admin/", headers=ADMIN).get_data(as_text=True)


# -- Cancel ---------------------------------------------------------------------------------


def test_cancel_needs_the_header_and_the_same_origin(example: Flask) -> None:
    client = example.test_client()
    sid = create_session(client, "/bits/a.bin", headers=ALICE)
    url = f"/bits-admin/sessions/{sid}/cancel"
    refused = [
        ADMIN,                                                     # no header: a plain form
        {**same_origin(), "Origin": "http://evil.example"},       # another site
        {**ADMIN, "X-BITS-Dashboard": "1", "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in refused:
        response = client.post(url, headers=headers)
        assert response.status_code == 403, headers
        assert response.get_json()["error"]
    assert client.get("/bits-admin/sessions.json", headers=ADMIN).get_json()["count"] == 1
    assert client.get(url, headers=same_origin()).status_code == 405


def test_cancel_removes_the_session_and_its_client_sees_it(example: Flask) -> None:
    client = example.test_client()
    sid = create_session(client, "/bits/a.bin", headers=ALICE)
    assert_ack(send_fragment(client, "/bits/a.bin", sid, b"12345", 0, 10, headers=ALICE), 200)
    other = create_session(client, "/bits/b.bin", headers=BOB)

    response = client.post(f"/bits-admin/sessions/{sid.lower()}/cancel",
                           headers=same_origin())
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"cancelled": True, "id": sid}
    ids = [r["id"] for r in client.get("/bits-admin/sessions.json",
                                       headers=ADMIN).get_json()["sessions"]]
    assert ids == [other]
    # The uploader's next fragment: the session is gone.
    assert_ack(send_fragment(client, "/bits/a.bin", sid, b"67890", 5, 10, headers=ALICE),
               500, SESSION_NOT_FOUND)
    # Again, or a session that never was: 404; not an id at all: 400.
    assert client.post(f"/bits-admin/sessions/{sid}/cancel",
                       headers=same_origin()).status_code == 404
    assert client.post("/bits-admin/sessions/nonsense/cancel",
                       headers=same_origin()).status_code == 400
    # A non-browser client (no Origin, no Sec-Fetch-Site) with the header may cancel.
    assert client.post(f"/bits-admin/sessions/{other}/cancel",
                       headers={**ADMIN, "X-BITS-Dashboard": "1"}).status_code == 200


def test_trusted_origins_for_proxies(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()
    BITSDashboard(app, allow_unprotected=True, trusted_origins=["https://admin.example/"])
    client = app.test_client()
    sid = create_session(client, "/bits/a.bin")
    url = f"/bits-admin/sessions/{sid}/cancel"
    headers = {"X-BITS-Dashboard": "1", "Origin": "https://admin.example"}
    assert client.post(url, headers={**headers, "Origin": "https://other.example"}
                       ).status_code == 403
    assert client.post(url, headers=headers).status_code == 200


# -- a real browser ---------------------------------------------------------------------------


def dashboard_app() -> Flask:
    """The gunicorn app of the browser test: the example app with its dashboard on
    (``register_dashboard`` is idempotent, so this holds once ``create_app`` calls it)."""
    app = create_app()
    register_dashboard(app)
    return app


def chromium_binary() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser",
                      "/usr/lib/chromium/chromium"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class CDPError(RuntimeError):
    pass


class DevTools:
    """The smallest DevTools-protocol client: one page, commands in order, events kept
    (and answered by handlers while a command is waiting, e.g. a confirm() dialog)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, t.Any]] = []
        self.handlers: dict[str, t.Callable[[dict[str, t.Any]], None]] = {}

    def send(self, method: str, **params: t.Any) -> int:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return self.next_id

    def call(self, method: str, timeout: float = 15.0, **params: t.Any) -> dict[str, t.Any]:
        wanted = self.send(method, **params)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout}s")
            self.ws.settimeout(remaining)
            message = json.loads(self.ws.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return t.cast(dict[str, t.Any], message.get("result", {}))
            if "method" in message:
                self.events.append(message)
                handler = self.handlers.get(message["method"])
                if handler is not None:
                    handler(message.get("params", {}))

    def evaluate(self, expression: str) -> t.Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, predicate: t.Callable[[t.Any], bool] = bool,
                 timeout: float = 15.0, what: str = "") -> t.Any:
        """Evaluate ``expression`` until ``predicate(value)``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expression}: still {value!r} after {timeout}s")
            time.sleep(0.05)

    def screenshot(self, *paths: Path) -> None:
        height = int(self.evaluate(
            "Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)"))
        self.call("Emulation.setDeviceMetricsOverride", width=1280,
                  height=max(200, min(height + 8, 2000)), deviceScaleFactor=1, mobile=False)
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


@contextlib.contextmanager
def chromium(profile: Path, log_path: Path) -> t.Iterator[DevTools]:
    """A headless Chromium on 127.0.0.1 with a fresh profile; stopped on exit."""
    binary = chromium_binary()
    assert binary is not None
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-dev-shm-usage", "--window-size=1280,720",
        f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0", "about:blank",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    devtools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}: see {log_path}")
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(x for x in targets if x.get("type") == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class SlowUploader(threading.Thread):
    """Sends fragments of one session at a steady pace until the server refuses one
    (the session was cancelled), the file is complete, or ``stop`` is set."""

    def __init__(self, base_url: str, path: str, sid: str, *, start: int, total: int,
                 fragment: int, pace: float) -> None:
        super().__init__(name="slow-uploader", daemon=True)
        self.base_url, self.path, self.sid = base_url, path, sid
        self.offset, self.total, self.fragment, self.pace = start, total, fragment, pace
        self.stop = threading.Event()
        self.last: wire.Reply | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = wire.connect(self.base_url, timeout=30)
        try:
            while self.offset < self.total and not self.stop.wait(self.pace):
                size = min(self.fragment, self.total - self.offset)
                rng = f"bytes {self.offset}-{self.offset + size - 1}/{self.total}"
                self.last = wire.bits_post(conn, self.path, "Fragment", session_id=self.sid,
                                           body=os.urandom(size),
                                           headers={"Content-Range": rng, **ALICE})
                if self.last.status != 200:
                    return
                self.offset = int(self.last.get("BITS-Received-Content-Range") or 0)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            conn.close()


ROW = 'document.querySelector(\'#bits-sessions tr[data-session-id="{sid}"]\')'


@pytest.mark.integration
def test_live_view_in_headless_chromium(tmp_path: Path) -> None:
    if chromium_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must call .ci/install-chromium")
        pytest.skip("chromium is not installed (run .ci/install-chromium as root)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("websocket-client is not installed (pip install -e '.[test]')")

    env = {
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_CLEANUP_INTERVAL": "0",
        "EXAMPLE_AUTH": "basic",
        "EXAMPLE_DASHBOARD": "1",
    }
    for folder in ("datasets", "reports"):
        (tmp_path / "uploads" / folder).mkdir(parents=True)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    uploader: SlowUploader | None = None
    with GunicornServer("tests.test_dashboard:dashboard_app()", env=env, workers=2,
                        log_path=tmp_path / "gunicorn.log") as server:
        conn = wire.connect(server.url, timeout=30)
        try:
            # Four sessions in different states, like a real afternoon.
            big = "/bits/datasets/survey-2024.parquet"
            total, fragment = 512 * 65536, 65536  # 32 MiB: a minute at the pace below
            sid = wire.bits_post(conn, big, "Create-Session", headers=ALICE).get(
                "BITS-Session-Id")
            assert sid
            head = 200 * fragment  # some history before the page opens
            assert _fragment(conn, big, sid, 0, head, total, ALICE) == head
            idle_path = "/bits/reports/q3-summary.xlsx"
            idle = wire.bits_post(conn, idle_path, "Create-Session", headers=BOB).get(
                "BITS-Session-Id")
            assert idle and _fragment(conn, idle_path, idle, 0, 700_000, 1_900_000, BOB)
            fresh = wire.bits_post(conn, "/bits/notes.txt", "Create-Session",
                                   headers=ALICE).get("BITS-Session-Id")
            fw = wire.bits_post(conn, "/reply/firmware-v2.bin", "Create-Session",
                                headers=BOB).get("BITS-Session-Id")
            assert fresh and fw
            assert _fragment(conn, "/reply/firmware-v2.bin", fw, 0, 300_000, 300_000, BOB)
        finally:
            conn.close()

        # Without credentials, nothing.
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(server.url + "/bits-admin/sessions.json", timeout=10)
        assert denied.value.code == 401
        denied.value.close()

        with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
            try:
                page.call("Page.enable")
                page.call("Runtime.enable")
                page.call("Log.enable")
                page.call("Network.enable")
                page.call("Network.setExtraHTTPHeaders", headers=ADMIN)
                page.call("Emulation.setDeviceMetricsOverride", width=1280, height=600,
                          deviceScaleFactor=1, mobile=False)
                page.handlers["Page.javascriptDialogOpening"] = lambda params: page.send(
                    "Page.handleJavaScriptDialog", accept=True)
                page.call("Page.navigate", url=server.url + "/bits-admin/")
                page.wait_for("document.readyState", lambda v: v == "complete",
                              what="page load")
                assert page.evaluate("document.title") == "BITS uploads"
                page.wait_for("document.querySelectorAll('#bits-sessions tbody tr').length",
                              lambda n: n == 4, what="four session rows")
                row = ROW.format(sid=sid)
                value = f"{row}.querySelector('progress').value"
                v1 = page.wait_for(value, lambda v: v == head, what="first progress")
                assert page.evaluate(f"{row}.querySelector('progress').max") == total
                assert page.evaluate(f"{row}.querySelector('.owner').textContent") == "alice"

                # The upload goes on; the bar follows by itself (no reload).
                uploader = SlowUploader(server.url, big, sid, start=head, total=total,
                                        fragment=fragment, pace=0.15)
                uploader.start()
                v2 = page.wait_for(value, lambda v: v > v1, what="progress moving")
                page.wait_for(value, lambda v: v > v2, what="progress moving again")
                page.wait_for(f"{row}.querySelector('.rate').textContent",
                              lambda s: s.endswith("/s") and not s.startswith("0 B"),
                              what="a live throughput")
                fresh_row = ROW.format(sid=fresh)
                assert page.evaluate(
                    f"{fresh_row}.querySelector('progress').hasAttribute('value')") is False
                assert page.evaluate(
                    f"{ROW.format(sid=fw)}.querySelector('.reply').textContent") == "replied"
                assert page.evaluate("document.getElementById('bits-error').hidden") is True
                # artifacts/ is git-ignored; the README's picture is refreshed on request.
                shots = [artifacts / "dashboard.png"]
                if os.environ.get("UPDATE_SCREENSHOTS") == "1":
                    shots.append(ROOT / "docs" / "live-view.png")
                page.screenshot(*shots)

                # Cancel, with a real click and the confirm() dialog accepted.
                box = page.evaluate(
                    "(() => { const r = " + row + ".querySelector('button.cancel')"
                    ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
                    " })()")
                for kind in ("mousePressed", "mouseReleased"):
                    page.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                              button="left", clickCount=1)
                page.call("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)
                page.wait_for(f"{row} === null", what="the cancelled row going away")
                page.wait_for("document.querySelectorAll('#bits-sessions tbody tr').length",
                              lambda n: n == 3, what="the other rows staying")
                assert any(e["method"] == "Page.javascriptDialogOpening"
                           and e["params"]["type"] == "confirm" for e in page.events)
                assert page.evaluate("document.getElementById('bits-error').hidden") is True
                page.screenshot(artifacts / "dashboard-after-cancel.png")
                problems = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"
                            or (e["method"] == "Log.entryAdded"
                                and e["params"]["entry"]["level"] == "error"
                                and "favicon" not in e["params"]["entry"].get("url", ""))]
                assert problems == []
            finally:
                if uploader is not None:
                    uploader.stop.set()
                    uploader.join(30)

        # The uploader was told, on its next fragment, that its session is gone.
        assert uploader is not None and uploader.error is None
        assert uploader.last is not None and uploader.last.status == 500, uploader.last
        assert uploader.last.get("BITS-Error-Code") == SESSION_NOT_FOUND
        assert uploader.offset < total
        request = urllib.request.Request(server.url + "/bits-admin/sessions.json",
                                         headers=ADMIN)
        with urllib.request.urlopen(request, timeout=10) as response:
            ids = {s["id"] for s in json.load(response)["sessions"]}
        assert ids == {idle, fresh, fw}
        assert not (tmp_path / "sessions" / "sessions" / sid).exists()


def _fragment(conn: t.Any, path: str, sid: str, first: int, size: int, total: int,
              auth: t.Mapping[str, str]) -> int:
    """Send ``size`` random bytes at ``first``; return the server's received count."""
    reply = wire.bits_post(conn, path, "Fragment", session_id=sid, body=os.urandom(size),
                           headers={"Content-Range": f"bytes {first}-{first + size - 1}/{total}",
                                    **auth})
    assert reply.status == 200, reply
    return int(reply.get("BITS-Received-Content-Range") or 0)
