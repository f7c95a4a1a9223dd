"""The MLflow tracking store itself, before and around any logging: is it there, can it be written, can two
processes share it.

``platform/tracking.py`` logs runs; this module answers the questions a CLI asks of the store first. Every CLI probes
the store within seconds before training starts (:func:`probe_tracking_store`: an unreachable server, a locked-out
user or an unwritable folder is one line, not a stack trace minutes later), lowers MLflow's HTTP retries for its own
process (:func:`limit_http_retries`), and opens an SQLite store so that concurrent sweeps can share it
(:func:`open_store`, :func:`store_lock`). Which store a command uses when given none is the run format's
(``run_format.resolve_tracking_uri``), since the dashboards resolve it the same way.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import sqlite3
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from coop_core.atomic import exclusive_lock

PROBE_TIMEOUT_S = 5.0  # the probe's whole budget per attempt: one clear line within seconds, never minutes
# MLflow's HTTP client retries a failed request 7 times with exponential back-off (about 4.5 minutes against a server
# that is not there). The CLIs lower that for their own process: a sweep whose server goes away keeps training and
# keeps its results on disk (platform/sweep_tracking.py) instead of stalling for minutes on every call.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class TrackingUnavailableError(OSError):
    """The MLflow tracking store cannot be reached or answers with errors; the message is one actionable line."""


def limit_http_retries() -> None:
    """Apply :data:`HTTP_RETRY_ENV` to this process (values the user set in the environment win)."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)


# The URI schemes MLflow builds a tracking store for (mlflow/tracking/_tracking_service/utils.py registers them; a
# plugin adds its own under the "mlflow.tracking_store" entry-point group, read by store_schemes()). An SQL store may
# name its driver after a "+" (postgresql+psycopg2://).
MLFLOW_STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                        "databricks-uc", "uc")


def store_schemes() -> tuple[str, ...]:
    """The tracking URI schemes MLflow can open here: its own and those of installed tracking-store plugins."""
    plugins = (e.name for e in importlib.metadata.entry_points(group="mlflow.tracking_store"))
    return tuple(dict.fromkeys((*MLFLOW_STORE_SCHEMES, *plugins)))


def check_scheme(uri: str) -> None:
    """Refuse a tracking URI whose scheme no MLflow store serves (a typo such as ``sqlite://`` for a relative path
    is still a known scheme; ``foo://bar`` is not), before anything tries to open it.

    Raises:
        TrackingUnavailableError: naming the scheme, the known ones, and examples of the fix.
    """
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    known = store_schemes()
    if scheme not in known:
        raise TrackingUnavailableError(
            f"--tracking-uri {uri}: MLflow has no tracking store for the scheme {scheme!r} (it opens "
            f"{', '.join(f'{k}://' for k in known if k)} and plain folders); pass e.g. sqlite:///mlflow.db (a file "
            "in this folder) or http://HOST:5000 (an MLflow server)")


def probe_tracking_store(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check in a few seconds that the tracking store answers, before any training starts.

    The scheme must be one MLflow serves (:func:`check_scheme`). An ``http(s)://`` server gets one request to its REST
    API (no retries); a ``sqlite:///`` file is opened and read (or, when it does not exist yet, its folder must be
    writable); a ``file:`` store's folder must be writable. Other stores (databricks, SQL servers, plugins) are left
    to MLflow.

    Raises:
        TrackingUnavailableError: an unknown scheme; unreachable, timing out, refusing access, answering with errors,
            or not MLflow.
    """
    check_scheme(uri)
    parsed = urlparse(uri)
    fallback = "or pass another --tracking-uri (e.g. sqlite:///mlflow.db, a file in this folder)"
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers=_auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read(1 << 16)
            json.loads(body or b"{}")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                why = (f"refuses access (HTTP {err.code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                       "or MLFLOW_TRACKING_TOKEN")
            elif err.code == 404:
                why = "answers, but not as an MLflow tracking server (HTTP 404 for its REST API); check the URL"
            else:
                why = f"answers with errors (HTTP {err.code} {err.reason}); check the server's log"
            raise TrackingUnavailableError(f"MLflow tracking server {uri} {why}, {fallback}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            text = (f"no answer within {timeout_s:.0f}s" if isinstance(reason, TimeoutError)
                    else str(getattr(reason, "strerror", None) or reason).lower())
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({text}); start it (e.g. mlflow server --host 127.0.0.1 "
                f"--port 5000) {fallback}") from None
        except ValueError:
            raise TrackingUnavailableError(f"{uri} answers, but not as an MLflow tracking server (its REST API "
                                           f"returned no JSON); check the URL, {fallback}") from None
        return
    db = sqlite_path(uri)
    if db is not None:
        if db.exists():
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=timeout_s)) as conn:
                    conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.Error as err:
                raise TrackingUnavailableError(f"tracking store {db} cannot be opened as an SQLite database ({err}); "
                                               f"{fallback.removeprefix('or ')}") from None
            return
        _probe_writable(db.parent, uri, fallback)
        return
    if parsed.scheme in ("", "file"):
        _probe_writable(Path(parsed.path or uri), uri, fallback)


SQLITE_BUSY_TIMEOUT_MS = 60_000  # how long a writer waits for another process's write lock (SQLite's default: 5 s)
_busy_timeout_installed = False


def open_store(uri: str) -> None:
    """Make an SQLite tracking store safe to share between processes (two sweeps at once on one ``mlflow.db``).

    Two things go wrong without this, and each is handled here:

    - creating the store: MLflow builds the tables (and upgrades old stores) when a process first opens the file; two
      processes doing it at once collide. Serialised: the first open happens under an exclusive lock on
      ``<db>.lock`` (``fcntl.flock``), so the second process finds the tables made.
    - writing: SQLite allows one writer at a time and makes the other wait 5 s before "database is locked". Retried:
      every SQLite connection this process opens waits up to ``SQLITE_BUSY_TIMEOUT_MS`` (SQLite's busy handler
      retries the lock) -- a CoOp driver's writes are a few milliseconds each, so a minute is never reached.

    Other stores are left alone.
    """
    global _busy_timeout_installed
    if sqlite_path(uri) is None:
        return
    # Imported here, not at the top: sqlalchemy and MLflow's client take 2.5-3.5 s to import (measured after torch, on
    # the 2-core development machine), which the CLIs spend only once they open a store, never for --help or bad input.
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    if not _busy_timeout_installed:
        # A listener on the Engine class (public SQLAlchemy API) reaches the engines MLflow creates inside its stores.
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", _set_busy_timeout)
        _busy_timeout_installed = True
    with store_lock(uri):
        try:
            client = MlflowClient(uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # creates (or upgrades) the tracking tables ...
            client.search_registered_models(max_results=1)  # ... and opens the registry on them
        except Exception as err:  # MLflow's own errors for a store it cannot create, read or upgrade
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise TrackingUnavailableError(f"MLflow cannot open the tracking store {uri} ({first}); pass another "
                                           "--tracking-uri") from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One process at a time for a read-modify-write on an SQLite store (creating it, moving the champion alias);
    a no-op for other stores, whose server serialises its own writes."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


def _set_busy_timeout(dbapi_connection: Any, connection_record: Any) -> None:

    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


def _probe_writable(folder: Path, uri: str, fallback: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".coop-write-check-"):
            pass
    except OSError as err:
        raise TrackingUnavailableError(f"tracking store {uri}: cannot write to {folder} ({err.strerror or err}); "
                                       f"{fallback.removeprefix('or ')}") from None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (``MLFLOW_TRACKING_TOKEN`` or user name and password)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])
