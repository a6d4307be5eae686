"""R26: Schemathesis over the OpenAPI schema: no 5xx, and responses match the schema.

The app runs with its lifespan started by the ``api`` fixture (a ``TestClient`` context: the
runner, its housekeeping thread, the admin token). Cases go to the same app object in process
through Schemathesis' ASGI client, which is used without entering it so it does not start a
second lifespan. Every case carries the admin's bearer token.

Each operation gets a bounded number of positive and negative cases; operations on one runtime
are also run against a real runtime id, so the success paths (boot, stop, rename, delete) are
exercised, not only 404s.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.api.conftest import ApiHarness

BASE_URL = "http://testserver"
MAX_EXAMPLES = 30  # per operation and mode: ~90 operations x 2 modes, about 100 s of CI time
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture
def schema(api: ApiHarness) -> Any:
    resp = api.client.get("/openapi.json")
    assert resp.status_code == 200
    return schemathesis.openapi.from_dict(resp.json())


def _operations(schema: Any) -> list[Any]:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 12, [op.label for op in ops]
    return ops


def _has_inputs(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or bool(operation.body)


def _run(
    api: ApiHarness,
    operation: Any,
    mode: GenerationMode,
    counts: Counter[str],
    path_parameters: dict[str, str] | None = None,
    environment: str | None = None,
) -> None:
    """Call the app with up to MAX_EXAMPLES cases for one operation and check each answer.

    ``path_parameters`` fixes path parameters; ``environment`` puts a real environment into the
    generated body (so creates can succeed).
    """
    session = ASGIClient(api.app)  # not entered: the api fixture owns the lifespan
    key = f"{mode.value} {operation.label}" + (" (real)" if path_parameters or environment else "")
    strategy = operation.as_strategy(mode, path_parameters=path_parameters)
    if environment is not None:

        def with_environment(case: Any) -> Any:
            if isinstance(case.body, dict):
                case.body["environment"] = environment
            return case

        strategy = strategy.map(with_environment)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(base_url=BASE_URL, session=session, headers=dict(api.headers))
        counts[key] += 1
        counts[f"status {response.status_code}"] += 1
        counts[f"{key} -> {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS, headers=dict(api.headers))

    try:
        check()
    except Unsatisfiable:
        # Nothing in this operation can be made invalid (no parameters, no body).
        assert mode is GenerationMode.NEGATIVE, key


def test_schemathesis_every_operation(api: ApiHarness, schema: Any) -> None:
    """R26: every operation, positive and negative cases: no 5xx, answers match the schema."""
    counts: Counter[str] = Counter()
    operations = _operations(schema)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run(api, operation, mode, counts)
    # The cases really ran: every operation had positive cases.
    for operation in operations:
        least = 5 if _has_inputs(operation) else 1
        assert counts[f"positive {operation.label}"] >= least, (operation.label, counts)
    assert sum(n for k, n in counts.items() if k.startswith("negative")) >= 50, counts
    assert not any(k.startswith("status 5") for k in counts), counts


RUNTIME_OPERATIONS = {
    ("GET", "/runtimes/{runtime_id}"),
    ("PATCH", "/runtimes/{runtime_id}"),
    ("DELETE", "/runtimes/{runtime_id}"),
    ("POST", "/runtimes/{runtime_id}/start"),
    ("POST", "/runtimes/{runtime_id}/stop"),
    ("GET", "/runtimes/{runtime_id}/log"),
}


def test_schemathesis_on_a_real_runtime(api: ApiHarness, schema: Any) -> None:
    """R26: The runtime's own operations with the id of an existing runtime (boots included), and
    creates with a real environment.

    Not ``POST /runtimes/{id}/executions``: on the fake backend a cell runs on this machine,
    unconfined, and fuzzed code must not.
    """
    counts: Counter[str] = Counter()
    per_runtime = [
        op
        for op in _operations(schema)
        if (op.method.upper(), op.path) in RUNTIME_OPERATIONS
        or (op.method.upper() == "GET" and op.path.startswith("/runtimes/{runtime_id}/"))
    ]
    assert {(op.method.upper(), op.path) for op in per_runtime} >= RUNTIME_OPERATIONS
    # DELETE last: it removes the runtime the others work on.
    per_runtime.sort(key=lambda op: op.method.upper() == "DELETE")
    rt = api.create_runtime("fuzzed", idle_timeout=0)
    for operation in per_runtime:
        _run(api, operation, GenerationMode.POSITIVE, counts, {"runtime_id": rt["id"]})
    for operation in per_runtime:
        assert counts[f"positive {operation.label} (real)"] >= 5, (operation.label, counts)
    create = schema["/runtimes"]["POST"]
    for env in ("python3", "bash@1"):
        _run(api, create, GenerationMode.POSITIVE, counts, environment=env)
    assert counts["positive POST /runtimes (real) -> 201"] > 0, counts
    assert counts["status 202"] > 0, counts  # start/stop were accepted at least once
    assert counts["status 200"] > 0, counts
    assert not any(k.startswith("status 5") for k in counts), counts
    # Whatever it went through, the runtime (if it still exists) ends somewhere legal and
    # leaves at most one container.
    assert len(api.containers(rt["id"])) <= 1


def test_openapi_documents_the_error_envelope(api: ApiHarness, schema: Any) -> None:
    doc = api.client.get("/openapi.json").json()
    create = doc["paths"]["/runtimes"]["post"]["responses"]
    get_one = doc["paths"]["/runtimes/{runtime_id}"]["get"]["responses"]
    for responses, status in ((create, "422"), (get_one, "404"), (get_one, "401")):
        assert status in responses, (status, sorted(responses))
        ref = responses[status]["content"]["application/json"]["schema"].get("$ref", "")
        assert ref.endswith("/ErrorOut"), (status, responses[status])


def test_the_checks_can_fail(api: ApiHarness, schema: Any) -> None:
    """The harness is not vacuous: a wrong answer or a 500 is caught by the checks used above."""
    from datetime import timedelta

    import httpx

    case = schema["/health"]["GET"].Case()
    request = httpx.Request("GET", BASE_URL + "/health")
    wrong = httpx.Response(200, json={"status": "weird"}, request=request)
    wrong.read()
    wrong.elapsed = right_elapsed = timedelta(milliseconds=1)
    with pytest.raises(FailureGroup):
        case.validate_response(wrong, checks=CHECKS)
    crashed = httpx.Response(500, json={"error": {}}, request=request)
    crashed.read()
    crashed.elapsed = right_elapsed
    with pytest.raises(FailureGroup):
        case.validate_response(crashed, checks=CHECKS)
    right = api.client.get("/health")
    case.validate_response(right, checks=CHECKS)


@pytest.mark.parametrize("path", ["/results/{}", "/results/{}/content"])
def test_result_id_out_of_range(api: ApiHarness, path: str) -> None:
    resp = api.get(path.format(2**63))
    assert resp.status_code in (404, 422), (resp.status_code, resp.text)
    assert set(resp.json()) == {"error"}
