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


def test_a_running_engine_is_reused_only_with_the_configuration_it_was_deployed_with():
    """The gateway compares this fingerprint with the running replica's (the e2e restart
    test sees the same configuration reused across processes)."""
    import dataclasses

    from serving.deployment import app_fingerprint

    config = EngineConfig("m", "/models/m", 64, 8, 2, chat_template="{{ x }}")
    options = {"replicas": {"num_replicas": 2}, "env": {"A": "1", "B": "2"}}
    same = app_fingerprint(config, options)
    assert same == app_fingerprint(
        EngineConfig("m", "/models/m", 64, 8, 2, chat_template="{{ x }}"),
        {"env": {"B": "2", "A": "1"}, "replicas": {"num_replicas": 2}},
    )  # the order of keys does not matter
    changed = [
        dataclasses.replace(config, max_lora_rank=64),
        dataclasses.replace(config, chat_template="{{ y }}"),
        dataclasses.replace(config, model_path="/models/other"),
        dataclasses.replace(config, allowed_media_domains=("img.example.com",)),
    ]
    assert same not in {app_fingerprint(c, options) for c in changed}
    assert same != app_fingerprint(config, {**options, "replicas": {"num_replicas": 3}})


def test_a_lock_per_adapter_lasts_only_while_it_is_held_or_awaited():
    import asyncio

    from serving.engine import KeyedLocks

    async def scenario() -> None:
        locks, order = KeyedLocks(), []

        async def use(name: str, tag: str) -> None:
            async with locks.hold(name):
                order.append(f"{tag} in")
                await asyncio.sleep(0.01)
                order.append(f"{tag} out")

        await asyncio.gather(use("a", "1"), use("a", "2"), use("b", "3"))
        assert order.index("1 out") < order.index("2 in")  # one at a time per name
        assert len(locks) == 0  # nothing kept once nobody holds or waits
        for n in range(1000):
            await use(f"adapter-{n}", "x")
        assert len(locks) == 0

    asyncio.run(scenario())


def test_vllms_answers_are_passed_on_as_openais_schema_has_them():
    from serving.engine import as_openai_answer

    chat = {
        "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "hi", "refusal": None,
                        "annotations": None, "audio": None, "tool_calls": []},
            "logprobs": {"content": []},
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                  "prompt_tokens_details": None},
    }  # fmt: skip
    answer = as_openai_answer(chat)
    assert answer["choices"][0]["message"] == {
        "role": "assistant", "content": "hi", "refusal": None, "tool_calls": []
    }  # fmt: skip
    assert answer["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    assert "prompt_tokens_details" not in answer["usage"]


def test_a_configured_tool_call_parser_lets_the_engine_choose_tools():
    plain = parsed(EngineConfig("m", "/models/m", 64, 8, 2))
    assert not plain.enable_auto_tool_choice
    tools = parsed(EngineConfig("m", "/models/m", 64, 8, 2, tool_call_parser="hermes"))
    assert tools.enable_auto_tool_choice and tools.tool_call_parser == "hermes"
