"""The trainer's calls to the serving engines (Ray Serve), on the same Ray cluster: the
judge of model graders (training/serve_judge.py) and the policy's rollouts through vLLM
(training/serve_sampler.py). It asks a base model's Serve application directly, as the
API's gateway does (service/chat/gateway.py): no API key, no HTTP hop, the same replicas,
adapter registration and vLLM request validation as any request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from serving.names import app_name


class ServingFailed(RuntimeError):
    """Serving did not answer (Ray, a timeout) or answered an error; says which."""


# Requests one trainer has in flight at once: a step's rollouts or judgements queue here
# rather than in Serve, whose queues are sized for the API's clients (the trainer is one).
MAX_IN_FLIGHT = 8
# Waits between tries while serving is full (Serve's backpressure), up to the timeout.
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class ServingClient:
    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._handles: dict[str, Any] = {}
        self.max_in_flight = max_in_flight
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def _in_flight(self) -> asyncio.Semaphore:
        """The running loop's gate (the trainer runs one event loop per step)."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Semaphore(self.max_in_flight))
        return self._gate[1]

    def _handle(self, base_model: str) -> Any:
        handle = self._handles.get(base_model)
        if handle is None:
            from ray import serve

            handle = self._handles[base_model] = serve.get_app_handle(app_name(base_model))
        return handle

    async def answer(
        self,
        kind: Literal["chat", "completions"],
        base_model: str,
        body: dict[str, Any],
        adapter: tuple[str, str | None] | None,
        timeout_s: float,
    ) -> dict[str, Any]:
        """The engine's whole (non-streamed) answer to `body`, with `adapter` (its name and
        its folder's key in the artifact store) registered first where it is not yet."""
        from ray.serve.exceptions import BackPressureError

        served = adapter[0] if adapter else base_model
        tries = 0
        async with self._in_flight():
            deadline = time.monotonic() + timeout_s  # from its turn on
            while True:
                try:
                    handle = (await asyncio.to_thread(self._handle, base_model)).options(
                        stream=True, multiplexed_model_id=adapter[0] if adapter else ""
                    )
                    replies = handle.respond.remote(kind, {**body, "stream": False}, adapter)
                    left = max(deadline - time.monotonic(), 0.001)
                    head = await asyncio.wait_for(replies.__anext__(), left)
                    break
                except BackPressureError:  # full of other clients' requests: wait our turn
                    wait = BACKOFF_S[min(tries, len(BACKOFF_S) - 1)]
                    tries += 1
                    if time.monotonic() + wait >= deadline:
                        raise ServingFailed(
                            f"`{served}`: serving stayed full for {timeout_s:g} s"
                        ) from None
                    await asyncio.sleep(wait)
                except TimeoutError:
                    raise ServingFailed(f"`{served}` did not answer in {timeout_s:g} s") from None
                except Exception as error:  # serving's own failure (Ray)
                    raise ServingFailed(f"`{served}`: serving failed: {error}") from None
        answer: dict[str, Any] = head.get("body") or {}
        if head.get("status") != 200:
            message = (answer.get("error") or {}).get("message", f"status {head.get('status')}")
            raise ServingFailed(f"`{served}` answered an error: {message}")
        return answer
