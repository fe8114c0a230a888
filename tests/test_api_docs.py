"""/docs and /redoc work offline: every script, style and icon they load is served by the API
itself; and the OpenAPI document describes every field of a job."""

from __future__ import annotations

import re

import pytest
from conftest_service import make_settings
from fastapi.testclient import TestClient

# What each asset must be served as: a browser refuses a script or a style of another type
# (every response carries X-Content-Type-Options: nosniff).
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def docs_client(tmp_path_factory):
    from service.api.app import create_app

    home = tmp_path_factory.mktemp("docs-home")
    with TestClient(create_app(make_settings(home, f"sqlite:///{home / 'rlora.db'}"))) as client:
        yield client


def _references(html: str) -> list[str]:
    """Every URL the page loads or links: src, href, spec-url and Swagger UI's url."""
    return re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html) + re.findall(r"""\burl:\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(docs_client, page):
    response = docs_client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "cdn" not in html.lower() and "googleapis" not in html
    references = _references(html)
    assert "/openapi.json" in references
    assets = [url for url in references if url != "/openapi.json"]
    assert any(url.endswith(".js") for url in assets), html
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        served = docs_client.get(url)
        assert served.status_code == 200, url
        suffix = url[url.rindex("."):]
        assert served.headers["content-type"].split(";")[0] == ASSET_TYPES[suffix], url
        assert len(served.content) > 1000, url  # the real bundle, not a placeholder
    if page == "/docs":
        assert '"validatorUrl": null' in html  # the spec is never sent to an outside validator


def test_docs_assets_are_not_a_file_server(docs_client):
    assert docs_client.get("/docs-assets/../../pyproject.toml").status_code == 404
    assert docs_client.get("/docs-assets/no-such.js").status_code == 404


def _undescribed(schema: dict, document: dict, where: str, seen: set[str]) -> list[str]:
    """Properties without a description in ``schema`` and the schemas it refers to."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _undescribed(document["components"]["schemas"][name], document, where, seen)
    missing = []
    for branch in schema.get("anyOf", []) + schema.get("allOf", []) + ([schema["items"]] if "items" in schema else []):
        missing += _undescribed(branch, document, where, seen)
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            missing.append(f"{where}.{name}")
        missing += _undescribed(prop, document, f"{where}.{name}", seen)
    return missing


def test_every_job_field_is_described(docs_client):
    document = docs_client.get("/openapi.json").json()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    job = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert set(job["properties"]) == {"base_model", "mixture", "adapter", "training"}
    assert _undescribed(body, document, "job", set()) == []
    # The nested schemas were walked, not skipped.
    training = document["components"]["schemas"]["TrainingSettings"]["properties"]
    assert "AdamW" in training["learning_rate"]["description"]
    assert "rank" in job["properties"]["adapter"]["description"]
