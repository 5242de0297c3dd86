"""OpenAI's graders, as a library: the schemas (schemas.py), templates, the text graders,
python graders in a sandbox, model graders through a Judge, and `multi` with a safe
formula. The API's grader endpoints and the reinforcement recipe both use `Graders`."""

from training.graders.grading import Graders, Pair
from training.graders.judge import Judge, JudgeReply, JudgeUnavailable
from training.graders.result import ErrorFlags, GradeResult
from training.graders.sample import sample_from_text
from training.graders.sandbox import PythonSandbox, SandboxLimits, SandboxUnavailable
from training.graders.schemas import AnyGrader, Grader
from training.graders.validation import InvalidGrader, parse_grader

__all__ = [
    "AnyGrader",
    "ErrorFlags",
    "GradeResult",
    "Grader",
    "Graders",
    "InvalidGrader",
    "Judge",
    "JudgeReply",
    "JudgeUnavailable",
    "Pair",
    "PythonSandbox",
    "SandboxLimits",
    "SandboxUnavailable",
    "parse_grader",
    "sample_from_text",
]
