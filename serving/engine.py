"""A vLLM engine with LoRA enabled, answering through vLLM's own OpenAI serving classes.

vLLM's `init_app_state` builds the chat and completion handlers exactly as `vllm serve`
does (chat templates, sampling fields, streaming chunks, usage), so this module only adds
what ftaas needs on top: adapters loaded by name on demand, and plain-data results that
can cross a Ray Serve handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

RequestKind = Literal["chat", "completion"]
# Adapters an engine keeps in host memory per accelerator slot unless configured; beyond
# them vLLM evicts the least used and reloads it from the replica's disk when asked again.
CPU_LORA_SLOTS_PER_GPU_SLOT = 4
NO_MEDIA_DOMAIN = ("media.invalid",)


def host_memory_adapters(max_loras: int, max_cpu_loras: int | None) -> int:
    """Adapters an engine keeps in host memory: as configured, else per accelerator slot."""
    return max_cpu_loras or max_loras * CPU_LORA_SLOTS_PER_GPU_SLOT


@dataclass(frozen=True)
class EngineConfig:
    model_id: str
    model_path: str
    max_model_len: int
    max_lora_rank: int
    max_loras: int
    # Host memory tier; None: CPU_LORA_SLOTS_PER_GPU_SLOT per accelerator slot.
    max_cpu_loras: int | None = None
    dtype: str = "auto"
    chat_template: str | None = None
    # The artifact store adapters are fetched from, and the disk this node gives them.
    storage_url: str = ""
    adapter_cache_bytes: int = 20 * 1024**3
    # Adapters registered with the engine (Serve's multiplexer drops the least recently used).
    max_adapters_per_replica: int = 64
    # Domains a multimodal model may fetch media from; none: no URL is fetched at all.
    allowed_media_domains: tuple[str, ...] = ()
    # vLLM's tool-call parser of this model; None: no automatic tool choice.
    tool_call_parser: str | None = None

    @property
    def host_memory_adapters(self) -> int:
        return host_memory_adapters(self.max_loras, self.max_cpu_loras)

    def cli_args(self) -> list[str]:
        args = [
            "--model", self.model_path,
            "--served-model-name", self.model_id,
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype,
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
            "--max-cpu-loras", str(self.host_memory_adapters),
            "--disable-log-stats",
        ]  # fmt: skip
        if self.chat_template:
            args += ["--chat-template", self.chat_template]
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        # vLLM fetches from anywhere when given no domains: a name that cannot resolve
        # (RFC 6761) makes the engine itself refuse every URL, behind the API's own check.
        args += ["--allowed-media-domains", *(self.allowed_media_domains or NO_MEDIA_DOMAIN)]
        return args


@dataclass
class RequestMeter:
    """What one request cost the engine, measured where vLLM hands out its tokens: the
    time to its first token (engine queueing and prefill included) and its token counts."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    # vLLM hands a non-streamed answer over whole: when its first token came is not seen.
    whole: bool = False

    def count(self, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.output_tokens += new_tokens

    def summary(self) -> dict[str, Any]:
        first, last = self.first_token_at, self.last_token_at
        if self.whole:
            first = last = None
        decoding = (last - first) if first is not None and last is not None else 0.0
        return {
            "time_to_first_token_s": None if first is None else first - self.started,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            # Tokens after the first, over the time they took: the decode speed.
            "decode_tokens_per_s": (self.output_tokens - 1) / decoding if decoding > 0 else None,
        }


# The meter of the request being answered: set by the replica around each request, read by
# the engine's `generate` (vLLM's OpenAI handlers call it inside the same task).
CURRENT_METER: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar(
    "ftaas_request_meter", default=None
)


def start_meter() -> RequestMeter:
    """A meter for the request this task answers from now on."""
    meter = RequestMeter()
    CURRENT_METER.set(meter)
    return meter


def _metered_engine_class() -> Any:
    """vLLM's AsyncLLM, counting each request's tokens into the current RequestMeter."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    class MeteredAsyncLLM(AsyncLLM):  # type: ignore[misc]
        # Every token this engine generated, for requests finished, failed or cancelled.
        generated_tokens = 0

        async def generate(self, prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            meter = CURRENT_METER.get()
            kind = getattr(sampling_params, "output_kind", None)
            delta = kind == RequestOutputKind.DELTA
            final_only = kind == RequestOutputKind.FINAL_ONLY
            seen: dict[int, int] = {}  # cumulative outputs: tokens already counted per choice
            first = True
            async for output in super().generate(prompt, sampling_params, *args, **kwargs):
                new = 0
                for choice in output.outputs:
                    length = len(choice.token_ids)
                    new += length if delta else length - seen.get(choice.index, 0)
                    seen[choice.index] = length
                self.generated_tokens += new
                if meter is not None:
                    meter.whole = meter.whole or final_only
                    if first and output.prompt_token_ids is not None:
                        meter.prompt_tokens += len(output.prompt_token_ids)
                    meter.count(new)
                first = False
                yield output

    return MeteredAsyncLLM


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _from_vllm_error(error: Any) -> tuple[int, dict[str, Any]]:
    info = error.error
    return int(info.code), openai_error(int(info.code), info.message, info.param)


class KeyedLocks:
    """One asyncio lock per key, kept only while a task holds or waits for it (a replica
    sees every adapter name ever asked for: a lock for each would only grow)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class OpenAIEngine:
    def __init__(self, engine: Any, state: Any):
        self.engine = engine
        self.models = state.openai_serving_models
        self.chat_handler = state.openai_serving_chat
        self.completion_handler = state.openai_serving_completion
        self._adapter_locks = KeyedLocks()

    @classmethod
    async def start(cls, config: EngineConfig) -> OpenAIEngine:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(config.cli_args())
        engine = _metered_engine_class().from_engine_args(AsyncEngineArgs.from_cli_args(args))
        state = State()
        tasks = await engine.get_supported_tasks()
        await init_app_state(engine, state, args, supported_tasks=tasks)
        return cls(engine, state)

    def loaded_adapters(self) -> list[str]:
        return sorted(self.models.lora_requests)

    def generated_tokens(self) -> int:
        return int(self.engine.generated_tokens)

    def unfinished_requests(self) -> int:
        """Requests inside the engine: running or waiting for a batch slot."""
        return int(self.engine.output_processor.get_num_unfinished_requests())

    async def load_adapter(self, name: str, path: str) -> tuple[int, dict[str, Any]] | None:
        """Make `name` servable; None when it is (already) loaded, else an error reply."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        async with self._adapter_locks.hold(name):
            if name in self.models.lora_requests:
                return None
            result = await self.models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=name, lora_path=path)
            )
            if isinstance(result, str):
                return None
            status, body = _from_vllm_error(result)
            # A broken adapter is a server-side fault, not the caller's bad request.
            return max(status, HTTPStatus.INTERNAL_SERVER_ERROR.value), body

    async def abort_adapter_requests(self, name: str) -> int:
        """Abort every request generating with adapter `name` (each answer ends at once, as
        if cancelled); how many there were."""
        states = self.engine.output_processor.request_states
        ids = [request_id for request_id, state in states.items() if state.lora_name == name]
        if ids:
            await self.engine.abort(ids, internal=True)
        return len(ids)

    async def unload_adapter(self, name: str) -> bool:
        async with self._adapter_locks.hold(name):
            lora = self.models.lora_requests.pop(name, None)
            if lora is None:
                return False
            await self.engine.remove_lora(lora.lora_int_id)
            return True

    async def respond(self, kind: RequestKind, body: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """First a head `{"status", "body"?, "stream"}`; for streams, then SSE strings."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMValidationError

        request_type = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            request = request_type.model_validate(body)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            yield {"status": 400, "body": openai_error(400, first["msg"], param), "stream": False}
            return
        try:
            if kind == "chat":
                result = await self.chat_handler.create_chat_completion(request, None)
            else:
                result = await self.completion_handler.create_completion(request, None)
        except (VLLMValidationError, ValueError) as error:
            # vLLM's own server turns these into 400s in an exception handler; here they
            # would otherwise cross Ray as a 500.
            message = str(error.args[0]) if error.args else str(error)
            # Some of vLLM's checks name the parameter only in the message ("n must be…").
            named = re.match(r"^(\w+) must ", message)
            param = getattr(error, "parameter", None) or (named.group(1) if named else None)
            yield {"status": 400, "body": openai_error(400, message, param), "stream": False}
            return
        if isinstance(result, ErrorResponse):
            status, error_body = _from_vllm_error(result)
            yield {"status": status, "body": error_body, "stream": False}
        elif hasattr(result, "__aiter__"):
            yield {"status": 200, "stream": True}
            async for chunk in result:
                yield chunk
        else:
            yield {
                "status": 200,
                "body": as_openai_answer(result.model_dump(mode="json")),
                "stream": False,
            }

    def shutdown(self) -> None:
        self.engine.shutdown()


# A message's fields that OpenAI's schema requires even when null; its other fields are
# absent rather than null (clients generated from the schema refuse a null array).
REQUIRED_NULLABLE_MESSAGE_FIELDS = frozenset({"role", "content", "refusal"})


def as_openai_answer(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's chat or completion answer as OpenAI's published schema has it: a message's
    optional fields and usage's details absent instead of null, and a choice's
    log-probabilities with their (required) `refusal`."""
    for choice in body.get("choices") or []:
        message = choice.get("message")
        if isinstance(message, dict):
            for key in [k for k, v in message.items() if v is None]:
                if key not in REQUIRED_NULLABLE_MESSAGE_FIELDS:
                    del message[key]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "message" in choice:
            logprobs.setdefault("refusal", None)
    usage = body.get("usage")
    if isinstance(usage, dict):
        for key in [k for k, v in usage.items() if v is None]:
            del usage[key]
    return body
