"""OpenAI-compatible /v1/embeddings, embedding quality, and API-key auth (real service)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest


def embed(client, inp, **extra):
    r = client.post("/v1/embeddings", json={"input": inp, "model": "text-embedding-test", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def vectors(body) -> np.ndarray:
    data = sorted(body["data"], key=lambda d: d["index"])
    return np.array([d["embedding"] for d in data], dtype=np.float64)


def test_single_input(client):
    body = embed(client, "a red bicycle")
    assert body["object"] == "list"
    assert body["model"] == "text-embedding-test"
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_batch_order_by_index(client):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'finance'}" for i in range(40)]
    batch = embed(client, texts)
    assert [d["index"] for d in batch["data"]] == list(range(40))
    got = vectors(batch)
    # each batch item equals the single-input embedding of the same text
    for i in (0, 7, 39):
        single = vectors(embed(client, texts[i]))[0]
        assert np.dot(got[i], single) > 0.9999
    # and a reversed request gives reversed vectors
    rev = vectors(embed(client, texts[::-1]))
    assert np.allclose(rev[::-1], got, atol=1e-4)


def test_embedding_quality(client):
    v = vectors(embed(client, ["a red bicycle", "a crimson bike", "tax law"]))
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    cos = v @ v.T
    assert cos[0, 1] > cos[0, 2] + 0.2, cos
    assert cos[0, 1] > 0.5, cos


def test_base64_encoding(client):
    f = vectors(embed(client, ["hello world"]))[0]
    b = embed(client, ["hello world"], encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b), dtype="<f4")
    assert decoded.shape == (384,)
    assert np.allclose(decoded, f, atol=1e-6)


def test_dimensions(client):
    assert len(embed(client, "x y", dimensions=384)["data"][0]["embedding"]) == 384
    r = client.post("/v1/embeddings", json={"input": "x", "model": "m", "dimensions": 256})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "dimensions"
    assert "384" in err["message"]


@pytest.mark.parametrize("inp, fragment", [
    (["ok", "fine", "also fine", "", "x"], "input[3] is empty"),
    ("", "input is empty"),
    ([], "empty list"),
    (42, "string or an array of strings"),
    ([1, 2, 3], "input[0] must be a string"),
    (["a", None], "input[1] must be a string"),
    (["a"] * 2049, "at most 2048"),
])
def test_invalid_input(client, inp, fragment):
    r = client.post("/v1/embeddings", json={"input": inp, "model": "m"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "input"
    assert "code" in err


def test_missing_input_and_bad_json(client):
    r = client.post("/v1/embeddings", json={"model": "m"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = client.post("/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


def test_max_items_accepted(client):
    body = embed(client, ["w"] * 2048)
    assert len(body["data"]) == 2048


def test_auth_required_when_key_set(auth_service):
    url = auth_service.base_url
    key = "test-secret-key-123"
    # healthz stays open
    assert httpx.get(url + "/healthz").status_code == 200
    for path, body in [("/v1/embeddings", {"input": "x", "model": "m"}),
                       ("/v1/documents:count", {}),
                       ("/v1/search", {"query": "x"})]:
        r = httpx.post(url + path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + path, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (path, r.text)
    assert key not in auth_service.log()


def test_no_auth_when_key_unset(client):
    r = client.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer whatever"})
    assert r.status_code == 200
