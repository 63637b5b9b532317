"""Documents API + search against the running service."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

NS = uuid.UUID("3f0e6a52-5d1b-4c7e-9a51-0d7f4f1c2b10")


def cid(table: str, key: str, n: int) -> str:
    return str(uuid.uuid5(NS, f"{table}|{key}|{n}"))


def key_of(i: int) -> str:
    return json.dumps({"id": i}, separators=(",", ":"))


def doc(table: str, key: str, texts, **meta):
    return {
        "table": table,
        "key": key,
        "chunks": [
            {"id": cid(table, key, n), "text": t,
             "metadata": {"_cdc": {"table": table, "key": key, "chunk": n, "hash": f"h{n}"}, **meta}}
            for n, t in enumerate(texts)
        ],
    }


def upsert(client, *docs):
    r = client.post("/v1/documents:upsert", json={"documents": list(docs)})
    assert r.status_code == 200, r.text
    return r.json()


def get(client, *keys):
    r = client.post("/v1/documents:get", json={"keys": [{"table": t, "key": k} for t, k in keys]})
    assert r.status_code == 200, r.text
    return r.json()["documents"]


def count(client, table=None):
    body = {} if table is None else {"table": table}
    r = client.post("/v1/documents:count", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def search(client, **body):
    r = client.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "collection": "test_documents", "vector_size": 384}


def test_upsert_get_count_search(client):
    t = "public.products"
    assert upsert(client,
                  doc(t, key_of(1), ["A red bicycle with a wicker basket and two gears."], title="bike"),
                  doc(t, key_of(2), ["Stainless steel chef knife, 20 cm blade."], title="knife"),
                  doc(t, key_of(3), ["Paperback guide to income tax law for freelancers.",
                                     "Chapter two covers VAT deductions."], title="book")) == {"upserted": 4}
    assert count(client, t) == 4

    docs = get(client, (t, key_of(3)), (t, key_of(1)), (t, key_of(999)))
    assert [(d["table"], d["key"]) for d in docs] == [(t, key_of(3)), (t, key_of(1)), (t, key_of(999))]
    book = docs[0]["chunks"]
    assert [c["id"] for c in book] == [cid(t, key_of(3), 0), cid(t, key_of(3), 1)]
    assert book[1]["text"] == "Chapter two covers VAT deductions."
    assert book[0]["metadata"] == {
        "_cdc": {"table": t, "key": key_of(3), "chunk": 0, "hash": "h0"}, "title": "book"}
    assert docs[2]["chunks"] == []

    results = search(client, query="crimson bike", table=t, limit=3)
    assert len(results) == 3
    assert results[0]["id"] == cid(t, key_of(1), 0)
    assert results[0]["text"].startswith("A red bicycle")
    assert results[0]["metadata"]["title"] == "bike"
    assert results[0]["metadata"]["_cdc"]["key"] == key_of(1)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)

    top_tax = search(client, query="taxes for self-employed people", table=t, limit=1)
    assert [r["metadata"]["title"] for r in top_tax] == ["book"]


def test_upsert_with_fewer_chunks_removes_surplus(client):
    t = "public.surplus"
    k = key_of(7)
    upsert(client, doc(t, k, ["one", "two", "three"]))
    assert len(get(client, (t, k))[0]["chunks"]) == 3
    upsert(client, doc(t, k, ["one, rewritten"]))
    chunks = get(client, (t, k))[0]["chunks"]
    assert [(c["id"], c["text"]) for c in chunks] == [(cid(t, k, 0), "one, rewritten")]
    assert count(client, t) == 1
    # An upsert with no chunks empties the document.
    assert upsert(client, {"table": t, "key": k, "chunks": []}) == {"upserted": 0}
    assert get(client, (t, k))[0]["chunks"] == []
    assert count(client, t) == 0


def test_repeated_upsert_is_idempotent(client):
    t = "public.idem"
    d1, d2 = doc(t, key_of(1), ["alpha", "beta"]), doc(t, key_of(2), ["gamma"])
    upsert(client, d1, d2)
    first = get(client, (t, key_of(1)), (t, key_of(2)))
    for _ in range(2):
        assert upsert(client, d1, d2) == {"upserted": 3}
    assert get(client, (t, key_of(1)), (t, key_of(2))) == first
    assert count(client, t) == 3


def test_upsert_replaces_only_its_own_key(client):
    t = "public.isolation"
    upsert(client, doc(t, key_of(1), ["x1", "x2"]), doc(t, key_of(2), ["y1", "y2"]))
    upsert(client, doc(t, key_of(1), ["x1 new"]))
    assert len(get(client, (t, key_of(2)))[0]["chunks"]) == 2
    assert count(client, t) == 3


def test_service_sets_cdc_table_and_key(client):
    t = "public.forced"
    k = key_of(5)
    body = {"table": t, "key": k, "chunks": [
        {"id": cid(t, k, 0), "text": "no metadata at all"},
        {"id": cid(t, k, 1), "text": "lying metadata", "metadata": {"_cdc": {"table": "evil", "key": "x"}}},
        {"id": cid(t, k, 2), "text": "null metadata", "metadata": None, "embedding": None},
    ]}
    upsert(client, body)
    chunks = get(client, (t, k))[0]["chunks"]
    assert len(chunks) == 3
    for n, c in enumerate(chunks):
        assert c["metadata"]["_cdc"]["table"] == t
        assert c["metadata"]["_cdc"]["key"] == k
        assert c["metadata"]["_cdc"]["chunk"] == n
    assert count(client, "evil") == 0
    assert count(client, t) == 3


def test_caller_supplied_embedding_is_used(client):
    t = "public.vectors"
    k = key_of(1)
    rng = np.random.default_rng(7)
    vec = rng.normal(size=384)
    vec = (vec / np.linalg.norm(vec)).tolist()
    body = doc(t, k, ["text that does not matter"])
    body["chunks"][0]["embedding"] = vec
    upsert(client, body)
    hits = search(client, embedding=vec, table=t, limit=1)
    assert hits[0]["id"] == cid(t, k, 0)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # Searching by the text does NOT find it with a high score: the stored vector is the given one.
    by_text = search(client, query="text that does not matter", table=t, limit=1)
    assert by_text[0]["score"] < 0.5


def test_delete_by_key_and_by_table(client):
    ta, tb, tc = "public.del_a", "public.del_b", "public.del_c"
    upsert(client, doc(ta, key_of(1), ["a1", "a1b"]), doc(ta, key_of(2), ["a2"]),
           doc(tb, key_of(1), ["b1"]), doc(tb, key_of(2), ["b2", "b2b"]), doc(tc, key_of(1), ["c1"]))
    r = client.post("/v1/documents:delete", json={"keys": [{"table": ta, "key": key_of(1)}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted_keys": 1, "deleted_tables": 0}
    assert get(client, (ta, key_of(1)))[0]["chunks"] == []
    assert len(get(client, (ta, key_of(2)))[0]["chunks"]) == 1
    # same key value in another table is untouched
    assert len(get(client, (tb, key_of(1)))[0]["chunks"]) == 1

    r = client.post("/v1/documents:delete", json={"tables": [tb]})
    assert r.json() == {"deleted_keys": 0, "deleted_tables": 1}
    assert count(client, tb) == 0
    assert count(client, ta) == 1 and count(client, tc) == 1

    r = client.post("/v1/documents:delete",
                    json={"keys": [{"table": ta, "key": key_of(2)}], "tables": [tc]})
    assert r.json() == {"deleted_keys": 1, "deleted_tables": 1}
    assert count(client, ta) == 0 and count(client, tc) == 0
    # deleting what is not there is fine
    r = client.post("/v1/documents:delete", json={"keys": [{"table": ta, "key": key_of(2)}]})
    assert r.status_code == 200


def test_search_table_filter(client):
    t1, t2 = "public.filter_one", "public.filter_two"
    upsert(client, doc(t1, key_of(1), ["Mountain bike with suspension fork."]),
           doc(t2, key_of(1), ["Road bicycle, carbon frame, very light."]),
           doc(t2, key_of(2), ["Cast iron frying pan."]))
    hits = search(client, query="bicycle", table=t1, limit=10)
    assert [h["metadata"]["_cdc"]["table"] for h in hits] == [t1]
    hits = search(client, query="bicycle", table=t2, limit=10)
    assert len(hits) == 2 and {h["metadata"]["_cdc"]["table"] for h in hits} == {t2}
    assert hits[0]["metadata"]["_cdc"]["key"] == key_of(1)
    unfiltered = search(client, query="bicycle", limit=100)
    assert {t1, t2} <= {h["metadata"]["_cdc"]["table"] for h in unfiltered}
    assert search(client, query="bicycle", table="public.nothing_here") == []


def test_count_all(client):
    t = "public.count_all"
    before = count(client)
    upsert(client, doc(t, key_of(1), ["c1", "c2"]))
    assert count(client) == before + 2
    r = client.post("/v1/documents:count")  # body optional
    assert r.status_code == 200 and r.json()["count"] == before + 2


@pytest.mark.parametrize("body, fragment", [
    ({"documents": [{"table": "t", "key": "k", "chunks": [{"id": "not-a-uuid", "text": "x"}]}]}, "UUID"),
    ({"documents": [{"table": "t", "key": "k", "chunks": [
        {"id": str(uuid.uuid4()), "text": "x", "embedding": [0.1] * 10}]}]}, "384"),
    ({"documents": [{"table": "", "key": "k", "chunks": []}]}, "table"),
    ({"documents": [{"table": "t", "key": "k", "chunks": [
        {"id": str(uuid.uuid4()), "text": "x", "metadata": {"text": "clash"}}]}]}, "reserved"),
    ({"documents": [{"table": "t", "key": "k", "chunks": [
        {"id": "6f1c8a2e-0000-4000-8000-000000000009", "text": "x"},
        {"id": "6f1c8a2e-0000-4000-8000-000000000009", "text": "y"}]}]}, "unique"),
    ({"docs": []}, "documents"),
])
def test_upsert_validation(client, body, fragment):
    r = client.post("/v1/documents:upsert", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]


def test_search_validation(client):
    assert client.post("/v1/search", json={}).status_code == 422
    assert client.post("/v1/search", json={"query": "x", "limit": 101}).status_code == 422
    assert client.post("/v1/search", json={"query": "x", "limit": 0}).status_code == 422
    assert client.post("/v1/search", json={"embedding": [0.5] * 3}).status_code == 422
    assert len(search(client, query="x", limit=100)) <= 100


def test_search_default_limit(client):
    t = "public.many"
    upsert(client, *[doc(t, key_of(i), [f"item number {i}"]) for i in range(8)])
    assert len(search(client, query="item", table=t)) == 5


def test_batched_upsert_and_delete_across_tables(client):
    ta, tb = "public.batch_a", "public.batch_b"
    upsert(client, doc(ta, key_of(1), ["a1", "a1b", "a1c"]), doc(ta, key_of(2), ["a2", "a2b"]),
           doc(tb, key_of(1), ["b1", "b1b"]))
    # One request rewrites several keys of two tables: each key keeps exactly its new chunks.
    upsert(client, doc(ta, key_of(1), ["a1 new"]), doc(ta, key_of(2), ["a2", "a2b"]),
           doc(tb, key_of(1), ["b1"]), doc(tb, key_of(3), ["b3"]))
    got = get(client, (ta, key_of(1)), (ta, key_of(2)), (tb, key_of(1)), (tb, key_of(3)))
    assert [len(d["chunks"]) for d in got] == [1, 2, 1, 1]
    assert count(client, ta) == 3 and count(client, tb) == 2
    # A key repeated in one request: the last occurrence wins.
    upsert(client, doc(ta, key_of(9), ["first", "first b"]), doc(ta, key_of(9), ["second"]))
    assert [c["text"] for c in get(client, (ta, key_of(9)))[0]["chunks"]] == ["second"]
    # keys + tables in one delete, a key's table also listed as a table
    r = client.post("/v1/documents:delete", json={
        "keys": [{"table": ta, "key": key_of(1)}, {"table": tb, "key": key_of(3)}], "tables": [ta]})
    assert r.json() == {"deleted_keys": 2, "deleted_tables": 1}
    assert count(client, ta) == 0
    assert [len(d["chunks"]) for d in get(client, (tb, key_of(1)), (tb, key_of(3)))] == [1, 0]


def test_get_with_embeddings(client):
    t = "public.with_vectors"
    k = key_of(1)
    vec = np.random.default_rng(3).normal(size=384)
    vec = (vec / np.linalg.norm(vec)).tolist()
    body = doc(t, k, ["given vector", "service-embedded"])
    body["chunks"][0]["embedding"] = vec
    upsert(client, body)
    plain = get(client, (t, k))[0]["chunks"]
    assert all("embedding" not in c for c in plain)
    r = client.post("/v1/documents:get", json={"keys": [{"table": t, "key": k}], "with_embeddings": True})
    assert r.status_code == 200, r.text
    chunks = r.json()["documents"][0]["chunks"]
    assert np.allclose(chunks[0]["embedding"], vec, atol=1e-6)
    own = np.array(chunks[1]["embedding"])
    assert own.shape == (384,) and abs(np.linalg.norm(own) - 1) < 1e-4
    r = client.post("/v1/embeddings", json={"input": "service-embedded"})
    assert np.dot(r.json()["data"][0]["embedding"], own) > 0.9999
    # Re-sending the stored vectors (metadata-only update) keeps them.
    for c in chunks:
        c["metadata"]["title"] = "updated"
    upsert(client, {"table": t, "key": k, "chunks": chunks})
    again = client.post("/v1/documents:get",
                        json={"keys": [{"table": t, "key": k}], "with_embeddings": True}).json()
    assert [c["metadata"]["title"] for c in again["documents"][0]["chunks"]] == ["updated"] * 2
    assert np.allclose(again["documents"][0]["chunks"][0]["embedding"], vec, atol=1e-6)


def test_scan_pages_through_a_table_with_cdc_metadata_only(client):
    table = "public.scan_" + uuid.uuid4().hex[:8]
    for i in range(7):
        d = doc(table, key_of(i), [f"scan text {i} a", f"scan text {i} b"], name=f"n{i}")
        d["chunks"][0]["metadata"]["_cdc"]["hidden"] = {"body": "a whole column value"}
        upsert(client, d)
    upsert(client, doc("public.other_" + uuid.uuid4().hex[:8], key_of(1), ["elsewhere"]))
    seen, after, pages = [], None, 0
    while True:
        r = client.post("/v1/documents:scan", json={"table": table, "after": after, "limit": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        for p in body["points"]:
            assert set(p["metadata"]) == {"_cdc"}, p
            assert "hidden" not in p["metadata"]["_cdc"]
            assert p["metadata"]["_cdc"]["table"] == table
            seen.append(p["id"])
        after = body["next"]
        if after is None:
            break
    assert pages >= 4
    assert sorted(seen) == sorted(cid(table, key_of(i), n) for i in range(7) for n in range(2))

    r = client.post("/v1/documents:scan",
                    json={"keys": [{"table": table, "key": key_of(3)}], "limit": 100})
    assert r.status_code == 200, r.text
    chunks = sorted(p["metadata"]["_cdc"]["chunk"] for p in r.json()["points"])
    assert chunks == [0, 1]


def test_scan_needs_exactly_one_scope_and_a_uuid_cursor(client):
    for body in ({}, {"table": "public.t", "keys": []}, {"table": "public.t", "after": "x"}):
        r = client.post("/v1/documents:scan", json=body)
        assert r.status_code == 422, (body, r.text)
