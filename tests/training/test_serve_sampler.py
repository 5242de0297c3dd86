"""The serving sampler's bookkeeping: each version of the policy's weights published once
under a name of its own, old versions' folders deleted, the engine's tokens kept as
sampled. (Rollouts through the real engine: tests/e2e/test_methods.py's reinforcement job.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.sampling import SampleRequest
from training.serve_sampler import KEPT_VERSIONS, ServingSampler
from training.storage import open_store

EOT = 2
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "city", "schema": {"type": "object", "properties": {}}},
}


class Weights:
    """Stands in for the peft model: what it saves names the version it was at."""

    def __init__(self) -> None:
        self.version = 0

    def save_pretrained(self, folder: Path, safe_serialization: bool) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"version": self.version}))


class Engine:
    """Answers as vLLM's completions do, and remembers what it was asked with."""

    def __init__(self, store: Any) -> None:
        self.store, self.calls = store, []

    async def answer(self, kind, base_model, body, adapter, timeout_s):  # type: ignore[no-untyped-def]
        name, key = adapter
        config = json.loads(self.store.get_bytes(f"{key}/adapter_config.json"))
        self.calls.append((kind, base_model, name, config["version"], body))
        choices = [
            {"index": 1, "text": "cut", "token_ids": [7, 8], "finish_reason": "length"},
            {"index": 0, "text": "done", "token_ids": [5, EOT], "finish_reason": "stop"},
        ]
        return {"choices": choices[: body["n"]]}


def test_each_version_of_the_weights_is_published_once_and_old_ones_are_deleted(tmp_path):
    store = open_store(str(tmp_path / "store"))
    weights = Weights()
    sampler = ServingSampler(
        weights,
        {EOT},
        store,
        base_model="ftaas-tiny",
        output_key="jobs/ftjob-1/attempt-1",
        rank=0,
        scratch=tmp_path / "scratch",
        version=lambda: weights.version,
        response_format=SCHEMA,
    )
    engine = sampler.serving = Engine(store)  # type: ignore[assignment]
    names = []
    for version in range(4):
        weights.version = version
        groups = sampler.sample_many(
            [SampleRequest([1, 2, 3], 2, 4), SampleRequest([4], 2, 4)], temperature=1.0
        )
        assert [[c.token_ids for c in group] for group in groups] == [[[5, EOT], [7, 8]]] * 2
        assert [[c.finished for c in group] for group in groups] == [[True, False]] * 2
        assert groups[0][0].text == "done"
        # Both groups of a step were asked of the same, current version.
        step_calls = engine.calls[-2:]
        assert {call[3] for call in step_calls} == {version}
        assert all(call[0] == "completions" and call[1] == "ftaas-tiny" for call in step_calls)
        assert step_calls[0][4]["prompt"] == [1, 2, 3] and step_calls[0][4]["n"] == 2
        # The job's response_format shapes every answer: vLLM's structured output.
        assert all(call[4]["response_format"] == SCHEMA for call in step_calls)
        names.append(step_calls[0][2])
        # Greedy validation at the same version reuses the published weights.
        sampler.sample([9], 1, 4, temperature=None)
        assert engine.calls[-1][2] == names[-1] and engine.calls[-1][4]["temperature"] == 0.0
    assert len(set(names)) == 4 and all(name.startswith("rollout-") for name in names)
    kept = {o.key.split("/")[-2] for o in store.list("jobs/ftjob-1/attempt-1/rollouts")}
    assert kept == {f"v{v}" for v in range(4 - KEPT_VERSIONS, 4)}
    sampler.close()
    assert list(store.list("jobs/ftjob-1/attempt-1/rollouts")) == []
