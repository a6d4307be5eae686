"""The commands that work on this machine rather than through the API: ``envctl serve``,
``envctl db upgrade|current`` and ``envctl base build``."""

from __future__ import annotations

import sys
from typing import Any

import click

from api.cli.errors import EXIT_FAILURE, EXIT_OK
from api.cli.options import Command, Group, local_options
from api.cli.output import print_json
from api.settings import load


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.command("serve", cls=Command)
@click.option("--host", metavar="ADDRESS", help="listen address (default 127.0.0.1, ENVCTL_API_HOST)")
@click.option("--port", type=int, metavar="PORT", help="listen port (default 8700, ENVCTL_API_PORT)")
@local_options
def serve(config: str | None, as_json: bool, host: str | None, port: int | None) -> int:
    """Run the API and the runner."""
    import logging

    import uvicorn

    from api.app import create_app
    from api.startup import Services

    settings = load(config)
    changes: dict[str, Any] = {}
    if host:
        changes["api_host"] = host
    if port:
        changes["api_port"] = port
    settings = settings.with_overrides(**changes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = Services.build(settings)
    app = create_app(services)
    services.runner.claim()  # a runner name in use is a clear error now, not a traceback later
    # The event loop answers requests while worker threads talk to agents and write to the
    # database; a thread that needs the GIL waits at most this long for another to let go of it
    # (Python's default is 5 ms, the whole budget of a cell's round trip).
    sys.setswitchinterval(0.0005)
    print(
        f"envctl serving on http://{settings.api_host}:{settings.api_port} "
        f"(data: {settings.data_dir}; database: {_safe_url(settings.effective_database_url)}; "
        f"token: {settings.admin_token_file})",
        file=sys.stderr,
    )
    services.start_registry()
    try:
        uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="warning")
    finally:
        services.close()  # done already by the app's lifespan, unless uvicorn never started it
    return EXIT_OK


@click.group("db", cls=Group)
def db() -> None:
    """The database schema: upgrade it, or show its revision."""


@db.command("upgrade")
@click.option("--revision", metavar="REV", default="head", show_default=True, help="the Alembic revision to migrate to")
@local_options
def db_upgrade(config: str | None, as_json: bool, revision: str) -> int:
    """Migrate the database to this envctl's schema."""
    from api.dbschema import current_revision, engine_for, head_revision, upgrade

    url = load(config).effective_database_url
    upgrade(url, revision)
    engine = engine_for(url)
    try:
        now = current_revision(engine)
    finally:
        engine.dispose()
    print(f"database {_safe_url(url)} is at revision {now} (head {head_revision()})")
    return EXIT_OK


@db.command("current")
@local_options
def db_current(config: str | None, as_json: bool) -> int:
    """Show the schema revision; exit 1 when it is behind this envctl's."""
    from api.dbschema import current_revision, engine_for, head_revision

    engine = engine_for(load(config).effective_database_url)
    try:
        now = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    print(f"current: {now or '(empty)'}  head: {head}" + ("" if now == head else "  -> run `envctl db upgrade`"))
    return EXIT_OK if now == head else EXIT_FAILURE


@click.group("base", cls=Group)
def base() -> None:
    """Base images, built from scratch with debootstrap."""


@base.command("build")
@click.argument("names", nargs=-1, help="images to build with their parents (default: all)")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: ENVCTL_BASE_MIRROR or the machine's apt mirror)")
@click.option("--no-verify", is_flag=True, help="skip each image's verify script")
@local_options
def base_build(config: str | None, as_json: bool, names: tuple[str, ...], mirror: str | None, no_verify: bool) -> int:
    """Build base images with debootstrap and register them."""
    from api.dbschema import check_current
    from envs.base import build as base_images
    from envs.kit.db import Database
    from envs.service import register_base_images

    settings = load(config)
    database = Database(settings.effective_database_url)
    check_current(database.engine)

    def progress(event: Any) -> None:
        if not as_json:
            print(f"  [{event.image}] {event.phase}: {event.message}", file=sys.stderr, flush=True)

    built = base_images.build(
        list(names) or None,
        mirror=mirror or settings.base_mirror,
        progress=progress,
        verify=not no_verify,
        extra_ca_certs=settings.base_extra_ca_certs,
    )
    with database.session() as s:
        registered = register_base_images(s, built)
        result: list[dict[str, Any]] = [
            {
                "image": b.name,
                "image_id": b.image_id,
                "reused": b.reused,
                "version": v.ref,
                "new_version": created,
            }
            for b, (v, created) in zip(built, registered, strict=True)
        ]
    database.dispose()
    if as_json:
        print_json(result)
    else:
        for r in result:
            how = "reused image" if r["reused"] else "built"
            what = "registered as" if r["new_version"] else "already registered as"
            print(f"{r['image']}: {how} {r['image_id'][:19]}, {what} {r['version']}")
    return EXIT_OK
