"""Rollouts through the serving engine: the policy's current LoRA weights hot-loaded into
the job's base model's vLLM engine (its multi-LoRA path, the one a finished model takes),
and every prompt of a step sampled there at once.

Why the serving engine rather than an engine of the trainer's own: the engine is already
up with the base weights (no second copy, no start-up per job: SmolLM2's costs ~55 s on a
CPU), and vLLM batches the whole step's groups, continuously, beside other traffic. The
price is one adapter write per step (the LoRA weights only: megabytes) and sharing the
engine with serving traffic. `bench/rft_sampling.py` measures it against the trainer's
own `generate` (training/sampling.py), which stays the default where serving is off.

Each version of the weights is a new adapter name and folder (a version is the number of
optimizer steps taken): vLLM's prefix cache and adapter caches key on the adapter, so a
name never changes weights. A version's folder is deleted two versions later, when no
request of it can be in flight; the replicas unregister old versions as they do any
least recently used adapter. The tokens are the engine's own (`return_token_ids`), the
answer's end token included, so the trainer scores exactly what was sampled.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.sampling import Completion, SampleRequest
from training.serving_client import ServingClient
from training.storage import ArtifactStore, join

# One rollout request (a prompt's group) that takes longer fails the step.
ROLLOUT_TIMEOUT_S = 600.0
KEPT_VERSIONS = 2  # published folders kept: the one in use and the one before


class ServingSampler:
    def __init__(
        self,
        model: Any,
        stops: set[int],
        store: ArtifactStore,
        *,
        base_model: str,
        output_key: str,
        rank: int,
        scratch: Path,
        version: Callable[[], int],
        response_format: dict[str, Any] | None = None,
        seed: int | None = None,
    ):
        self.model, self.stops, self.store = model, stops, store
        self.base_model, self.rank, self.scratch = base_model, rank, scratch
        self.version, self.response_format = version, response_format
        self.output_key, self.seed = output_key, seed
        # Adapter names are global on an engine: unique per attempt and worker.
        self._tag = hashlib.sha256(f"{output_key}/{rank}".encode()).hexdigest()[:16]
        self.serving = ServingClient()
        self.published: list[tuple[int, str]] = []  # (version, key), oldest first
        self._calls = 0

    def _adapter(self) -> tuple[str, str]:
        """The current weights' adapter name and key, written to the store first when this
        version has not been."""
        version = self.version()
        key = join(self.output_key, "rollouts", f"worker-{self.rank}", f"v{version}")
        if not self.published or self.published[-1][0] != version:
            local = self.scratch / "rollout-adapter"
            shutil.rmtree(local, ignore_errors=True)
            self.model.save_pretrained(local, safe_serialization=True)
            self.store.delete(key)  # what a restarted attempt left half-written
            self.store.put_folder(local, key)
            shutil.rmtree(local, ignore_errors=True)
            self.published.append((version, key))
            while len(self.published) > KEPT_VERSIONS:
                self.store.delete(self.published.pop(0)[1])
        return f"rollout-{self._tag}-v{version}", key

    def sample_many(
        self, requests: Sequence[SampleRequest], temperature: float | None
    ) -> list[list[Completion]]:
        adapter = self._adapter()
        self._calls += 1  # a version samples training groups, then validation ones
        return asyncio.run(self._sample_all(requests, temperature, adapter))

    def sample(
        self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, temperature: float | None
    ) -> list[Completion]:
        return self.sample_many([SampleRequest(prompt_ids, n, max_new_tokens)], temperature)[0]

    async def _sample_all(
        self,
        requests: Sequence[SampleRequest],
        temperature: float | None,
        adapter: tuple[str, str],
    ) -> list[list[Completion]]:
        version = self.version()
        return list(
            await asyncio.gather(
                *(
                    self._group(r, temperature, adapter, self._seed(version, index))
                    for index, r in enumerate(requests)
                )
            )
        )

    def _seed(self, version: int, index: int) -> int | None:
        """The job's seed makes its answers reproducible: one vLLM seed per group, different
        for each step, worker and prompt."""
        if self.seed is None:
            return None
        mixed = f"{self.seed}/{self.rank}/{version}/{self._calls}/{index}".encode()
        return int.from_bytes(hashlib.sha256(mixed).digest()[:4], "big") >> 1

    async def _group(
        self,
        request: SampleRequest,
        temperature: float | None,
        adapter: tuple[str, str],
        seed: int | None,
    ) -> list[Completion]:
        body: dict[str, Any] = {
            "model": adapter[0],
            "prompt": list(request.prompt_ids),
            "n": request.n,
            "max_tokens": request.max_new_tokens,
            # As the trainer's sampler: plain temperature sampling, or greedy.
            "temperature": temperature if temperature is not None else 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "stop_token_ids": sorted(self.stops),
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if self.response_format is not None:
            body["response_format"] = self.response_format
        if seed is not None:
            body["seed"] = seed
        answer = await self.serving.answer(
            "completions", self.base_model, body, adapter, ROLLOUT_TIMEOUT_S
        )
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        return [self._completion(choice) for choice in choices]

    def _completion(self, choice: dict[str, Any]) -> Completion:
        tokens = list(choice.get("token_ids") or [])
        finished = choice.get("finish_reason") == "stop"
        end = next((i for i, token in enumerate(tokens) if token in self.stops), None)
        if end is not None:
            tokens = tokens[: end + 1]
        return Completion(tokens, choice.get("text") or "", finished)

    def close(self) -> None:
        """The published versions' folders: none is asked for any more."""
        for _, key in self.published:
            self.store.delete(key)
        self.published.clear()
