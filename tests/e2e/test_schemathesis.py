"""schemathesis against the live server's own OpenAPI document: whatever the inputs,
positive (valid by the schema) or negative (not), no operation answers with a 5xx and
every error is in OpenAI's envelope."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 25


def test_no_input_makes_the_server_fail(server: RunningServer):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    session = requests.Session()
    session.headers["Authorization"] = "Bearer test-key"
    ran: list[str] = []
    failures: list[str] = []

    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.base_url, session=session, timeout=60)
        ran.append(case.operation.label)
        where = f"{case.method} {case.formatted_path}"
        if response.status_code >= 500:
            failures.append(f"{where}: {response.status_code} {response.text[:300]}")
        elif response.status_code >= 400:
            error = response.json().get("error", {})
            if not {"message", "type", "param", "code"} <= set(error):
                failures.append(f"{where} not in OpenAI's envelope: {response.text[:200]}")

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests every run: a red CI is reproducible
                print_blob=False,
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(check))
            try:
                run()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                assert mode == GenerationMode.NEGATIVE, operation.label
    print(f"\nschemathesis: {len(ran)} requests over {len(operations)} operations")
    assert not failures, "\n".join(sorted(set(failures))[:20])
    with requests.get(f"{server.base_url}/health", timeout=5) as health:
        assert health.status_code == 200
