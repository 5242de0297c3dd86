"""The engine's command line, as vLLM's own parser reads it."""

from __future__ import annotations

from serving.engine import EngineConfig


def parsed(config: EngineConfig):  # type: ignore[no-untyped-def]
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(config.cli_args())


def test_an_engine_fetches_media_only_from_allowed_domains():
    # vLLM fetches from anywhere when given no domains: ftaas gives one that cannot resolve.
    closed = parsed(EngineConfig("m", "/models/m", 64, 8, 2))
    assert closed.allowed_media_domains == ["media.invalid"]
    allowed = EngineConfig("m", "/models/m", 64, 8, 2, allowed_media_domains=("img.example.com",))
    assert parsed(allowed).allowed_media_domains == ["img.example.com"]
