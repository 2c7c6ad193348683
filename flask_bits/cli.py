"""``flask bits ...``: list, cancel and clean up sessions.

Safe to run while the server runs, on any node sharing the session folder: every change
goes through the same session locks as the server's.
"""

from __future__ import annotations

import json
import time
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from .server import BITSServer

bits_cli = AppGroup("bits", help="Manage BITS upload sessions.")


def _servers() -> list[BITSServer]:
    return list(current_app.extensions.get("bits", {}).values())


def _by_folder() -> list[BITSServer]:
    """One server per session folder (directories may share a folder)."""
    seen: dict[str, BITSServer] = {}
    for server in _servers():
        seen.setdefault(server.store.folder, server)
    return list(seen.values())


@bits_cli.command("sessions")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sessions_command(as_json: bool) -> None:
    """List open upload sessions."""
    now = time.time()
    rows: list[dict[str, t.Any]] = []
    for server in _by_folder():
        for state in server.store.iter_states():
            rows.append({
                "id": state.id,
                "directory": state.directory,
                "remote_path": state.remote_path,
                "owner": state.owner,
                "received": state.received,
                "total": state.total,
                "age": round(now - state.created, 1),
                "idle": round(now - state.last_activity, 1),
                "phase": state.phase,
                "reply": (state.forward or {}).get("status"),
            })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No open sessions.")
        return
    click.echo(f"{'SESSION':40} {'DIR':8} {'OWNER':12} {'RECEIVED/TOTAL':>22} "
               f"{'AGE':>9} {'IDLE':>9} PHASE  PATH")
    for r in rows:
        total = "?" if r["total"] is None else r["total"]
        click.echo(
            f"{r['id']:40} {r['directory'][:8]:8} {str(r['owner'] or '-')[:12]:12} "
            f"{str(r['received']) + '/' + str(total):>22} {_age(r['age']):>9} "
            f"{_age(r['idle']):>9} {r['phase']:6} {r['remote_path']}"
        )


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@bits_cli.command("cleanup")
def cleanup_command() -> None:
    """Remove expired sessions, expired tombstones and leftovers. Idempotent."""
    total = 0
    servers = _servers()
    for server in _by_folder():
        same = [s for s in servers if s.store.folder == server.store.folder]
        removed = server.store.cleanup(
            tombstone_timeout=min(s.config.tombstone_timeout for s in same),
            timeouts={s.name: s.config.session_timeout for s in same},
            upload_folders={s.name: s.config.upload_folder for s in same},
        )
        for what, ident in removed:
            click.echo(f"removed {what} {ident}")
        total += len(removed)
    click.echo(f"{total} item(s) removed.")


@bits_cli.command("cancel")
@click.argument("session_id")
def cancel_command(session_id: str) -> None:
    """Cancel one session, as a Cancel-Session from its client would."""
    for server in _by_folder():
        if server.cancel(session_id):
            click.echo(f"cancelled {session_id}")
            return
    raise click.ClickException(f"no open session {session_id}")
