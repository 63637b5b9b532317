"""Persistence across restarts, the stored payload layout, and startup checks."""

from __future__ import annotations

import httpx
from qdrant_client import QdrantClient
from qdrant_client.http import models as qm

from .conftest import Service

CHUNK_ID = "0b5e3a5e-6a2c-4c57-9a3e-1f1e2d3c4b5a"


def test_durable_payload_layout_and_restart(tmp_path):
    svc = Service(tmp_path)
    try:
        svc.wait_healthy()
        r = httpx.post(svc.base_url + "/v1/documents:upsert", json={"documents": [{
            "table": "public.products", "key": '{"id":1}',
            "chunks": [{"id": CHUNK_ID, "text": "durable text",
                        "metadata": {"title": "t", "_cdc": {"chunk": 0, "hash": "abc"}}}]}]}, timeout=60)
        assert r.status_code == 200 and r.json() == {"upserted": 1}
    finally:
        svc.stop()

    # The service is stopped: read the local Qdrant storage directly.
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        info = client.get_collection("test_documents")
        assert set(info.config.params.vectors) == {"text"}
        assert info.config.params.vectors["text"].size == 384
        assert info.config.params.vectors["text"].distance == qm.Distance.COSINE
        points, _ = client.scroll(
            "test_documents", with_vectors=True,
            scroll_filter=qm.Filter(must=[
                qm.FieldCondition(key="_cdc.table", match=qm.MatchValue(value="public.products")),
                qm.FieldCondition(key="_cdc.key", match=qm.MatchValue(value='{"id":1}'))]))
        assert len(points) == 1
        p = points[0]
        assert str(p.id) == CHUNK_ID
        assert p.payload["text"] == "durable text"
        assert p.payload["title"] == "t"
        assert p.payload["_cdc"] == {"table": "public.products", "key": '{"id":1}', "chunk": 0, "hash": "abc"}
        assert "_node_content" in p.payload  # LlamaIndex can rebuild the node
        assert len(p.vector["text"]) == 384
    finally:
        client.close()

    svc2 = Service(tmp_path)
    try:
        svc2.wait_healthy()
        r = httpx.post(svc2.base_url + "/v1/documents:count", json={}, timeout=30)
        assert r.json() == {"count": 1}
    finally:
        svc2.stop()


def test_startup_fails_on_incompatible_collection(tmp_path):
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    client.create_collection("test_documents",
                             vectors_config=qm.VectorParams(size=128, distance=qm.Distance.DOT))
    client.close()
    svc = Service(tmp_path)
    try:
        svc.proc.wait(timeout=120)
        assert svc.proc.returncode != 0
        log = svc.log()
        assert "size=128" in log and "size=384" in log, log
    finally:
        svc.stop()


def test_unreachable_qdrant_server_gives_503(tmp_path):
    from .conftest import free_port
    import time

    svc = Service(tmp_path, {"QDRANT_URL": f"http://127.0.0.1:{free_port()}",
                             "PYTHON_INDEXER_QDRANT_TIMEOUT": "2"})
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and svc.proc.poll() is None:
            try:
                status = httpx.get(svc.base_url + "/healthz", timeout=10).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status == 503, svc.log()
        r = httpx.post(svc.base_url + "/v1/documents:count", json={}, timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "vector_store_unavailable"
        r = httpx.post(svc.base_url + "/v1/documents:upsert", timeout=30, json={"documents": [
            {"table": "t", "key": "k", "chunks": [{"id": CHUNK_ID, "text": "x"}]}]})
        assert r.status_code == 503
        # embeddings do not need the vector store
        r = httpx.post(svc.base_url + "/v1/embeddings", json={"input": "x"}, timeout=30)
        assert r.status_code == 200
    finally:
        svc.stop()
