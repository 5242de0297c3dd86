"""`python -m service [serve|stop|keys]`: run the embedded server, stop its Ray head, or
manage API keys (`python -m service keys --help`)."""

from __future__ import annotations

import argparse
import logging
import sys

from service.config import Settings
from service.local_guard import is_loopback

KEEP_ALIVE_S = 75  # seconds an idle connection is kept: nginx's keepalive_timeout default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from service.organization.cli import main as keys_main

        return keys_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "stop", "keys"])
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per plugin otherwise

    if args.command == "stop":
        from service.ray_cluster import stop_embedded_head

        stop_embedded_head(settings)
        return 0

    if (
        not settings.keys_configured
        and not is_loopback(settings.host)
        and not _keys_stored(settings)
    ):
        print(
            f"Refusing to serve on {settings.host} without API keys: make one with "
            "`python -m service keys create --organization ORG`, set FTAAS_API_KEYS "
            "(comma-separated key:organization pairs), or bind to 127.0.0.1.",
            file=sys.stderr,
        )
        return 2

    return serve(settings)


def _keys_stored(settings: Settings) -> bool:
    """Keys in the job store, once the environment's (none here) are registered as the
    server will on start."""
    from service.db import Database
    from service.organization.keys import KeyRing

    keys = KeyRing(Database(settings.resolved_database_url))
    keys.bootstrap(settings.api_key_organizations, settings.admin_key_organizations)
    return not keys.open_access()


def serve(settings: Settings) -> int:
    """Prepare everything (each step fails as one line naming it), then serve."""
    import uvicorn

    from service.app import create_app, prepare_runtime
    from service.startup import StartupError, bind_port, log_to_file

    settings.home.mkdir(parents=True, exist_ok=True)
    log_to_file(settings)
    try:
        sock = bind_port(settings)
        runtime = prepare_runtime(settings)
    except StartupError as error:
        print(error, file=sys.stderr)
        return 1
    app = create_app(settings, runtime)
    # log_config=None: uvicorn's records go through the handlers set up here (console and
    # the server log) instead of its own.
    # timeout_keep_alive above clients' own idle limit (httpx, the SDK's: 5 s, as uvicorn's
    # default): otherwise an idle connection the client reuses can be closed by the server
    # as the request arrives, "Server disconnected without sending a response" (seen in CI
    # while the machine was busy training and judging, the event loop late by seconds).
    config = uvicorn.Config(app, log_config=None, log_level="info", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
