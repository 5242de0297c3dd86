"""`python -m service [serve|stop]`: run the embedded server, or stop its Ray head."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from service.config import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "stop"])
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "stop":
        from service.ray_cluster import stop_embedded_head

        stop_embedded_head(settings)
        return 0

    if settings.open_access and not _is_loopback(settings.host):
        print(
            f"Refusing to serve on {settings.host} without API keys: set FTAAS_API_KEYS "
            "(comma-separated key:organization pairs) or bind to 127.0.0.1.",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
