"""Grading many (sample, item) pairs with one grader: the API's /run grades one, the
trainer a step's samples. Nothing here raises for a grader's fault: each pair gets a
GradeResult whose flags say what went wrong, with reward 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.graders.formula import FormulaError, evaluate_formula
from training.graders.judge import Judge, judge_grade
from training.graders.result import GradeResult
from training.graders.sandbox import PythonSandbox, SandboxUnavailable
from training.graders.schemas import (
    AnyGrader,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from training.graders.template import InvalidVariable, UnparsedSample, render
from training.graders.text import string_check, text_similarity

Pair = tuple[dict[str, Any], dict[str, Any]]  # (sample, item)

# Judge calls in flight at once for one batch.
JUDGE_CONCURRENCY = 16


@dataclass
class Graders:
    """What graders run on: a judge for model graders, a sandbox for python graders
    (either may be None: those graders then score 0 with a server error)."""

    judge: Judge | None = None
    sandbox: PythonSandbox | None = None

    async def grade(
        self, grader: AnyGrader, sample: dict[str, Any], item: dict[str, Any]
    ) -> GradeResult:
        return (await self.grade_many(grader, [(sample, item)]))[0]

    async def grade_many(self, grader: AnyGrader, pairs: Sequence[Pair]) -> list[GradeResult]:
        if isinstance(grader, MultiGrader):
            return await self._multi(grader, pairs)
        if isinstance(grader, PythonGrader):
            return await self._python(grader, pairs)
        if isinstance(grader, ScoreModelGrader | LabelModelGrader):
            return await self._judged(grader, pairs)
        return [_local(grader, sample, item) for sample, item in pairs]

    async def _python(self, grader: PythonGrader, pairs: Sequence[Pair]) -> list[GradeResult]:
        results = [GradeResult(grader.name, grader.type) for _ in pairs]
        try:
            if self.sandbox is None:
                raise SandboxUnavailable("python graders do not run here")
            outcomes = await self.sandbox.grade_many(grader.source, pairs)
        except SandboxUnavailable as error:
            for result in results:
                result.failed(
                    python_grader_server_error=True,
                    python_grader_server_error_type="sandbox_unavailable",
                )
                result.details = str(error)
            return results
        for result, outcome in zip(results, outcomes, strict=True):
            result.execution_time = outcome.seconds
            if outcome.error == "server":
                result.failed(
                    python_grader_server_error=True,
                    python_grader_server_error_type="sandbox_error",
                )
                result.details = outcome.details
            elif outcome.error == "runtime":
                result.failed(
                    python_grader_runtime_error=True,
                    python_grader_runtime_error_details=outcome.details,
                )
            else:
                result.reward = outcome.reward
        return results

    async def _judged(
        self, grader: ScoreModelGrader | LabelModelGrader, pairs: Sequence[Pair]
    ) -> list[GradeResult]:
        gate = asyncio.Semaphore(JUDGE_CONCURRENCY)

        async def one(sample: dict[str, Any], item: dict[str, Any]) -> GradeResult:
            result = GradeResult(grader.name, grader.type)
            started = time.perf_counter()
            async with gate:
                if self.judge is None:
                    result.failed(
                        model_grader_server_error=True,
                        model_grader_server_error_details="no judge model is available here",
                    )
                else:
                    try:
                        await judge_grade(grader, item, sample, self.judge, result)
                    except InvalidVariable as error:
                        _invalid(result, error)
            result.execution_time = time.perf_counter() - started
            return result

        return list(await asyncio.gather(*(one(sample, item) for sample, item in pairs)))

    async def _multi(self, grader: MultiGrader, pairs: Sequence[Pair]) -> list[GradeResult]:
        started = time.perf_counter()
        names = list(grader.graders)
        # Each sub-grader grades the whole batch (one sandbox per python sub-grader).
        graded = await asyncio.gather(*(self.grade_many(grader.graders[n], pairs) for n in names))
        results = []
        for index in range(len(pairs)):
            result = GradeResult(grader.name, grader.type)
            for name, sub in zip(names, graded, strict=True):
                mine = sub[index]
                result.sub_rewards[name] = mine.reward
                result.errors.merge(mine.errors)
                for model, usage in mine.token_usage_per_model.items():
                    result.add_usage(model, usage)
                result.sampled_model_name = result.sampled_model_name or mine.sampled_model_name
                result.details = result.details or mine.details
            try:
                result.reward = evaluate_formula(grader.calculate_output, result.sub_rewards)
            except FormulaError as error:
                result.failed(formula_parse_error=True)
                result.details = str(error)
            result.execution_time = time.perf_counter() - started
            results.append(result)
        return results


def _invalid(result: GradeResult, error: InvalidVariable) -> None:
    if isinstance(error, UnparsedSample):
        result.failed(sample_parse_error=True)
    else:
        result.failed(invalid_variable_error=True)
    result.details = str(error)


def _local(
    grader: StringCheckGrader | TextSimilarityGrader, sample: dict[str, Any], item: dict[str, Any]
) -> GradeResult:
    """string_check and text_similarity: in this process, microseconds to milliseconds."""
    result = GradeResult(grader.name, grader.type)
    started = time.perf_counter()
    try:
        text, reference = render(grader.input, item, sample), render(grader.reference, item, sample)
        if isinstance(grader, StringCheckGrader):
            result.reward = string_check(grader.operation, text, reference)
        else:
            result.reward = text_similarity(grader.evaluation_metric, text, reference)
    except InvalidVariable as error:
        _invalid(result, error)
    except Exception as error:  # a metric library's own failure: never the caller's
        result.failed(other_error=True)
        result.details = f"{type(error).__name__}: {error}"
    result.execution_time = time.perf_counter() - started
    return result
