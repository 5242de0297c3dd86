"""`python -m service [serve|stop]`: run the embedded server, or stop its Ray head."""

from __future__ import annotations

import argparse
import logging
import sys

from service.config import Settings
from service.local_guard import is_loopback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "stop"])
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

    if settings.open_access and not is_loopback(settings.host):
        print(
            f"Refusing to serve on {settings.host} without API keys: set FTAAS_API_KEYS "
            "(comma-separated key:organization pairs) or bind to 127.0.0.1.",
            file=sys.stderr,
        )
        return 2

    return serve(settings)


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
    config = uvicorn.Config(app, log_config=None, log_level="info")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
