"""Heavy work on threads of its own, bounded per organization and in all
(service/capacity.py): past a bound a 429 at once, never a queue of held threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.capacity import Capacity
from service.errors import InvalidRequest, RateLimited


def test_past_its_bounds_heavy_work_is_a_429_and_others_still_get_in():
    capacity = Capacity("adapter imports", threads=1, most=3, per_organization=2)
    go = threading.Event()

    async def scenario() -> None:
        def work(value: int) -> int:
            go.wait(10)
            return value

        held = [asyncio.create_task(capacity.run("a", work, n)) for n in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimited) as mine:
            await capacity.run("a", work, 3)
        assert "your organization has 2 in progress" in mine.value.message
        assert mine.value.extra_headers["retry-after"] == "1"
        other = asyncio.create_task(capacity.run("b", work, 4))  # waits for the one thread
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimited) as full:
            await capacity.run("c", work, 5)
        assert "the server has 3 in progress" in full.value.message
        go.set()
        assert await asyncio.gather(*held, other) == [1, 2, 4]
        assert capacity.admitted == 0  # every slot given back
        assert await capacity.run("a", work, 6) == 6

    asyncio.run(scenario())


def test_imports_past_the_bound_are_refused_while_every_other_route_answers(client, parts):
    """Two imports of one organization hold their threads (a slow archive, played by a
    gate); a third is a 429 at once, and listing, retrieving and /health answer."""
    gate, entered = threading.Event(), threading.Semaphore(0)

    def slow_import(tenant, request):  # type: ignore[no-untyped-def]
        entered.release()
        gate.wait(30)
        raise InvalidRequest("the archive was slow and bad", param="adapter_file")

    parts["models"].import_adapter = slow_import
    body = {"base_model": "ftaas-tiny", "adapter_file": "file-x"}
    answers: list[int] = []

    def post() -> None:
        answers.append(client.post("/v1/models", json=body).status_code)

    held = [threading.Thread(target=post) for _ in range(2)]
    for thread in held:
        thread.start()
    for _ in held:
        assert entered.acquire(timeout=10)
    refused = client.post("/v1/models", json=body)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert client.get("/v1/models").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/v1/files").status_code == 200
    gate.set()
    for thread in held:
        thread.join(10)
    assert answers == [400, 400]
