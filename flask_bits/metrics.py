"""Prometheus metrics for the BITS upload directories of a Flask app (optional).

Needs ``prometheus_client`` (``pip install 'Flask-BITS[metrics]'``); importing
:mod:`flask_bits` never does, and this module imports it only when metrics are set up::

    from flask_bits.metrics import BITSMetrics

    BITSMetrics(app)                      # GET /metrics
    BITSMetrics(app, path="/internal/metrics", authorize=lambda request: ...)

Counters and histograms are fed by the :mod:`flask_bits.signals` of every directory of
the app (each series has a ``directory`` label). Open sessions are not counted in
process memory: ``bits_sessions{directory,phase}`` and ``bits_session_bytes`` are read
from the session folders at scrape time, so they are right whichever worker (or node
sharing the folders) answers the scrape.

Metrics (prefix ``bits_`` by default; every one has a ``directory`` label):

* ``packets_total{packet_type,status}``, ``packet_duration_seconds{packet_type}``
* ``received_bytes_total``: Content-Length of Fragment packets, whatever the answer
* ``uploads_completed_total``, ``uploaded_bytes_total`` (file sizes),
  ``last_upload_completed_timestamp_seconds`` (gauge, multiprocess mode ``max``)
* ``sessions_opened_total``, ``sessions_closed_total{completed}``,
  ``sessions_cancelled_total``, ``sessions_expired_total`` (removed by cleanup)
* ``reply_forward_duration_seconds``, ``lock_wait_seconds`` (histograms)
* ``sessions{phase}``, ``session_bytes`` (gauges read from disk at scrape time)

Several worker processes (gunicorn ``-w N``): set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty folder in the environment of the gunicorn master (before anything imports
``prometheus_client``). Each worker then writes its values to files there and a scrape,
whichever worker answers it, adds up the files of all workers, dead ones included
(counters keep counting across worker restarts). Wipe the folder when gunicorn starts
and register the ``child_exit`` hook in ``gunicorn.conf.py``::

    import os, shutil
    from flask_bits.metrics import child_exit  # noqa: F401  (gunicorn finds it by name)

    def on_starting(server):
        folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)

``child_exit`` calls ``prometheus_client.multiprocess.mark_process_dead(worker.pid)``.
Use one :class:`BITSMetrics` per process in that mode (the files are keyed by metric
name, not by registry).
"""

from __future__ import annotations

import logging
import os
import time
import typing as t
import weakref

from flask import Flask
from flask import Response
from flask import abort
from flask import request
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response as WerkzeugResponse

from . import signals
from .store import COMPLETE
from .store import FINISHED
from .store import RECEIVING

if t.TYPE_CHECKING:
    from types import ModuleType

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .server import BITSServer

log = logging.getLogger("flask_bits")

#: The session phases reported by ``bits_sessions`` (every one, zeros included).
PHASES = (RECEIVING, COMPLETE, FINISHED)

#: ``authorize(request)`` for the metrics endpoint: ``True`` serves the metrics, a
#: response is sent as is (a 401 challenge), anything else is a 403.
MetricsAuthorizer = t.Callable[[Request], "bool | WerkzeugResponse"]

PACKET_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0)
FORWARD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)
LOCK_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


def _prometheus() -> ModuleType:
    try:
        import prometheus_client
        import prometheus_client.multiprocess  # noqa: F401
        import prometheus_client.values  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "flask_bits.metrics needs the prometheus_client package: "
            "pip install 'Flask-BITS[metrics]' (or pip install prometheus_client)."
        ) from exc
    return prometheus_client


def multiprocess_dir() -> str | None:
    """The folder of prometheus_client's multiprocess mode, if its variable is set."""
    return (os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            or os.environ.get("prometheus_multiproc_dir") or None)


def child_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``child_exit`` hook: drop the live gauges of a dead worker.

    Import it into ``gunicorn.conf.py`` (``from flask_bits.metrics import child_exit``).
    """
    if multiprocess_dir():
        _prometheus().multiprocess.mark_process_dead(worker.pid)


class BITSMetrics:
    """Prometheus metrics of every BITS upload directory of an app.

    :param app: the app to set up now (else call :meth:`init_app`).
    :param path: URL of the metrics page; ``None`` adds no route (call :meth:`generate`
        yourself, or serve ``registry`` some other way in single-process mode).
    :param registry: where the metrics are registered (single-process mode); by default
        a registry of this instance, so the page shows the BITS metrics only. Pass
        ``prometheus_client.REGISTRY`` to show them with the process's other metrics.
        In multiprocess mode the page is built at scrape time from the files of all
        processes (plus the sessions gauge) instead.
    :param namespace: prefix of every metric name.
    :param authorize: see :data:`MetricsAuthorizer`; ``None`` serves everyone (put the
        path behind your proxy's access rules, or pass a callable).
    :param endpoint: the Flask endpoint name of the metrics page.

    :raises ImportError: prometheus_client is not installed.
    :raises RuntimeError: ``PROMETHEUS_MULTIPROC_DIR`` was set only after
        prometheus_client was imported (its values would stay in this process).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        path: str | None = "/metrics",
        registry: CollectorRegistry | None = None,
        namespace: str = "bits",
        authorize: MetricsAuthorizer | None = None,
        endpoint: str = "bits_metrics",
    ) -> None:
        pc = _prometheus()
        self.path = path
        self.namespace = namespace
        self.authorize = authorize
        self.endpoint = endpoint
        self.multiprocess = bool(getattr(pc.values.ValueClass, "_multiprocess", False))
        if multiprocess_dir() and not self.multiprocess:
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before "
                "it was: set it in the environment of the process (the gunicorn master) "
                "before anything imports prometheus_client."
            )
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self._apps: list[weakref.ref[Flask]] = []
        self._sessions = SessionsCollector(self)
        self._define(pc)
        if not self.multiprocess:
            self.registry.register(self._sessions)
        if app is not None:
            self.init_app(app)

    def _define(self, pc: ModuleType) -> None:
        ns, reg, d = self.namespace, self.registry, ("directory",)
        self.packets = pc.Counter(
            "packets", "BITS_POST packets answered, by packet type and HTTP status.",
            ("directory", "packet_type", "status"), namespace=ns, registry=reg)
        self.packet_duration = pc.Histogram(
            "packet_duration_seconds", "Time to answer a BITS_POST packet.",
            ("directory", "packet_type"), namespace=ns, registry=reg, buckets=PACKET_BUCKETS)
        self.received_bytes = pc.Counter(
            "received_bytes", "Request body bytes of Fragment packets (their Content-Length), "
            "whatever the answer.", d, namespace=ns, registry=reg)
        self.sessions_opened = pc.Counter(
            "sessions_opened", "Sessions created by Create-Session.", d, namespace=ns, registry=reg)
        self.sessions_closed = pc.Counter(
            "sessions_closed", "Sessions ended by Close-Session; completed=false when the "
            "upload had not finished.", ("directory", "completed"), namespace=ns, registry=reg)
        self.sessions_cancelled = pc.Counter(
            "sessions_cancelled", "Sessions ended by Cancel-Session.", d, namespace=ns,
            registry=reg)
        self.sessions_expired = pc.Counter(
            "sessions_expired", "Idle sessions removed by cleanup.", d, namespace=ns,
            registry=reg)
        self.uploads_completed = pc.Counter(
            "uploads_completed", "Uploads whose file is complete (placed or handed to the "
            "reply handler).", d, namespace=ns, registry=reg)
        self.uploaded_bytes = pc.Counter(
            "uploaded_bytes", "Total size of the completed uploads.", d, namespace=ns,
            registry=reg)
        self.last_upload = pc.Gauge(
            "last_upload_completed_timestamp_seconds",
            "Unix time of the last completed upload.", d, namespace=ns, registry=reg,
            multiprocess_mode="max")
        self.forward_duration = pc.Histogram(
            "reply_forward_duration_seconds", "Time the server application took to answer "
            "an upload-reply forward.", d, namespace=ns, registry=reg, buckets=FORWARD_BUCKETS)
        self.lock_wait = pc.Histogram(
            "lock_wait_seconds", "Time spent waiting for a session lock.", d, namespace=ns,
            registry=reg, buckets=LOCK_BUCKETS)

    # -- setup ----------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Connect to the app's BITS signals and add the metrics route.

        Directories added to the app later are covered too.

        :raises RuntimeError: the app already has BITS metrics.
        """
        if "bits_metrics" in app.extensions:
            raise RuntimeError("This app already has BITS metrics (app.extensions"
                               "['bits_metrics']).")
        # The app keeps this object (and so the weakly connected receivers) alive.
        app.extensions["bits_metrics"] = self
        self._apps.append(weakref.ref(app))
        for signal, receiver in (
            (signals.packet_handled, self._on_packet),
            (signals.session_created, self._on_created),
            (signals.session_closed, self._on_closed),
            (signals.session_cancelled, self._on_cancelled),
            (signals.session_expired, self._on_expired),
            (signals.upload_completed, self._on_completed),
            (signals.reply_forwarded, self._on_forwarded),
            (signals.lock_waited, self._on_lock_waited),
        ):
            signal.connect(receiver, app)
        if self.path:
            app.add_url_rule(self.path, self.endpoint, self._view, methods=["GET"])

    def servers(self) -> list[BITSServer]:
        """The BITS directories of every app this object is set up on."""
        found: list[BITSServer] = []
        for ref in self._apps:
            app = ref()
            if app is not None:
                found.extend(app.extensions.get("bits", {}).values())
        return found

    # -- receivers ------------------------------------------------------------------

    def _on_packet(self, sender: Flask, *, directory: str, packet_type: str, status: int,
                   bytes: int, duration: float, **_: t.Any) -> None:
        self.packets.labels(directory, packet_type, str(status)).inc()
        self.packet_duration.labels(directory, packet_type).observe(duration)
        if packet_type == "Fragment" and bytes:
            self.received_bytes.labels(directory).inc(bytes)

    def _on_created(self, sender: Flask, *, directory: str, **_: t.Any) -> None:
        self.sessions_opened.labels(directory).inc()

    def _on_closed(self, sender: Flask, *, directory: str, completed: bool = False,
                   **_: t.Any) -> None:
        self.sessions_closed.labels(directory, "true" if completed else "false").inc()

    def _on_cancelled(self, sender: Flask, *, directory: str, **_: t.Any) -> None:
        self.sessions_cancelled.labels(directory).inc()

    def _on_expired(self, sender: Flask, *, directory: str, **_: t.Any) -> None:
        self.sessions_expired.labels(directory).inc()

    def _on_completed(self, sender: Flask, *, directory: str, size: int | None = None,
                      **_: t.Any) -> None:
        self.uploads_completed.labels(directory).inc()
        if size:
            self.uploaded_bytes.labels(directory).inc(size)
        self.last_upload.labels(directory).set(time.time())

    def _on_forwarded(self, sender: Flask, *, directory: str, duration: float,
                      **_: t.Any) -> None:
        self.forward_duration.labels(directory).observe(max(0.0, duration))

    def _on_lock_waited(self, sender: Flask, *, directory: str, seconds: float,
                        **_: t.Any) -> None:
        self.lock_wait.labels(directory).observe(max(0.0, seconds))

    # -- exposition -----------------------------------------------------------------

    def generate(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics page: ``(body, content type)`` for an ``Accept`` header value.

        In multiprocess mode the values of all worker processes are added up.
        """
        pc = _prometheus()
        if self.multiprocess:
            registry = pc.CollectorRegistry()
            pc.multiprocess.MultiProcessCollector(registry)
            registry.register(self._sessions)
        else:
            registry = self.registry
        encoder, content_type = pc.exposition.choose_encoder(accept or "")
        return encoder(registry), content_type

    def _view(self) -> WerkzeugResponse:
        if self.authorize is not None:
            verdict = self.authorize(request._get_current_object())  # type: ignore[attr-defined]
            if isinstance(verdict, WerkzeugResponse):
                return verdict
            if verdict is not True:
                abort(403)
        body, content_type = self.generate(request.headers.get("Accept"))
        return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


class SessionsCollector:
    """``bits_sessions{directory,phase}`` and ``bits_session_bytes{directory}``, read from
    the session folders at scrape time (right in any process, on any node)."""

    def __init__(self, metrics: BITSMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def _families(self) -> tuple[t.Any, t.Any]:
        from prometheus_client.core import GaugeMetricFamily

        metrics = self._metrics()
        ns = metrics.namespace if metrics is not None else "bits"
        sessions = GaugeMetricFamily(
            f"{ns}_sessions", "Open upload sessions by phase (read from the session "
            "folders at scrape time).", labels=["directory", "phase"])
        held = GaugeMetricFamily(
            f"{ns}_session_bytes", "Bytes received and held by open sessions.",
            labels=["directory"])
        return sessions, held

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        sessions, held = self._families()
        metrics = self._metrics()
        servers = metrics.servers() if metrics is not None else []
        counts: dict[tuple[str, str], int] = {}
        sizes: dict[str, int] = {}
        for server in servers:
            sizes.setdefault(server.name, 0)
            for phase in PHASES:
                counts.setdefault((server.name, phase), 0)
        seen: set[str] = set()
        for server in servers:
            store = server.store
            if store.folder in seen:
                continue  # directories sharing a session folder: count it once
            seen.add(store.folder)
            try:
                for state in store.iter_states():
                    key = (state.directory, state.phase)
                    counts[key] = counts.get(key, 0) + 1
                    sizes[state.directory] = sizes.get(state.directory, 0) + state.received
            except OSError as exc:
                log.warning("metrics: cannot list sessions in %s: %s", store.folder, exc)
        for (directory, phase), count in sorted(counts.items()):
            sessions.add_metric([directory, phase], count)
        for directory, size in sorted(sizes.items()):
            held.add_metric([directory], size)
        return [sessions, held]


def init_metrics(app: Flask, path: str | None = "/metrics", **options: t.Any) -> BITSMetrics:
    """``BITSMetrics(app, path=path, **options)``."""
    return BITSMetrics(app, path=path, **options)
