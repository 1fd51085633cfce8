"""The OpenAPI document `imgindex serve` serves, fuzzed by schemathesis against the real server
process: no request it builds from the document (valid or not) gets a 5xx, and every answer's
status, content type, headers and body are ones the document lists. Bounded: a few derandomized
examples per operation and mode, so the run is the same each time and short on 2 cores."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from imgindex.indexes.build import build_index  # noqa: E402
from imgindex.pipeline.config import load_config  # noqa: E402
from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar  # noqa: E402
from imgindex.pipeline.job import run_embed  # noqa: E402

from test_serve import start, stop  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def served_schema(tmp_path_factory, checkpoint, photos):
    """A four-image index served on a loopback port, and the OpenAPI document it serves."""
    root = tmp_path_factory.mktemp("schema")
    names = sorted(photos)[:4]
    write_tar(root / "photos-00000.tar", [(f"{name}.jpg", jpeg_bytes(photos[name].resize((96, 72))))
                                          for name in names])
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(root / "photos-00000.tar")], str(root / "emb"), config, progress=False)
    build_index(str(root / "emb"), str(root / "idx"), progress=False)
    process, url = start(root / "idx", "--max-upload", "300K")
    try:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    finally:
        stop(process)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error_and_every_answer_is_documented(served_schema, mode):
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "GET /api/health", "GET /api/info", "POST /api/search/image", "GET /api/search/key",
        "POST /api/search/vector", "GET /api/thumbnail", "GET /"}
    for operation in operations:
        if mode == "negative" and not (operation.definition.raw.get("parameters") or operation.body):
            continue  # nothing to send that the document forbids
        @settings(max_examples=15, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def answered_as_documented(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        answered_as_documented()
