"""Document store: (table, key) documents made of chunks, kept as LlamaIndex TextNodes in Qdrant.

Every point's payload holds the chunk metadata at top level (so `_cdc.table`, `_cdc.key`, ...
are filterable by Qdrant), the chunk `text`, and LlamaIndex's own fields (`_node_content`,
`_node_type`, `doc_id`, ...) so LlamaIndex retrieval works on the same collection.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import NodeRelationship, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import QdrantClient
from qdrant_client.http import models as qm

from .config import VECTOR_NAME, VECTOR_SIZE, Settings
from .embedding import OnnxMiniLMEmbedding

log = logging.getLogger("python_indexer.store")

CDC = "_cdc"
TABLE_FIELD = "_cdc.table"
KEY_FIELD = "_cdc.key"
TEXT_KEY = "text"
# Payload fields owned by LlamaIndex / this service; user metadata may not use them.
INTERNAL_KEYS = frozenset({"_node_content", "_node_type", "document_id", "doc_id", "ref_doc_id"})
RESERVED_KEYS = INTERNAL_KEYS | {TEXT_KEY}
# Filters with many alternatives are split into calls of this many documents.
FILTER_BATCH = 256


class StoreUnavailable(Exception):
    """The vector store could not be reached or failed unexpectedly (transient: HTTP 503)."""


class CollectionConfigError(Exception):
    """The existing collection is incompatible with this service (fatal at startup)."""


@dataclass
class Chunk:
    id: str
    text: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    embedding: Optional[List[float]] = None


@dataclass
class Document:
    table: str
    key: str
    chunks: List[Chunk]


class CdcQdrantVectorStore(QdrantVectorStore):
    """QdrantVectorStore that also stores the node text as a top-level `text` payload field."""

    def _build_points(self, nodes, sparse_vector_name):  # type: ignore[override]
        points, ids = super()._build_points(nodes, sparse_vector_name)
        for point, node in zip(points, nodes):
            point.payload[TEXT_KEY] = node.get_content()
        return points, ids


def _doc_filter(table: str, key: Optional[str] = None) -> qm.Filter:
    must: List[Any] = [qm.FieldCondition(key=TABLE_FIELD, match=qm.MatchValue(value=table))]
    if key is not None:
        must.append(qm.FieldCondition(key=KEY_FIELD, match=qm.MatchValue(value=key)))
    return qm.Filter(must=must)


def _keys_filter(keys: Sequence[Tuple[str, str]], tables: Sequence[str] = ()) -> qm.Filter:
    """Points of any of the (table, key) pairs or of any of the tables.

    Keys are grouped per table into one MatchAny condition, which keeps filters small (and
    local mode, which evaluates filters in Python point by point, fast).
    """
    by_table: Dict[str, List[str]] = {}
    for table, key in keys:
        by_table.setdefault(table, []).append(key)
    parts: List[qm.Filter] = []
    for table, table_keys in by_table.items():
        if table in tables:
            continue  # the whole table goes anyway
        key_match = (qm.MatchValue(value=table_keys[0]) if len(table_keys) == 1
                     else qm.MatchAny(any=table_keys))
        parts.append(qm.Filter(must=[
            qm.FieldCondition(key=TABLE_FIELD, match=qm.MatchValue(value=table)),
            qm.FieldCondition(key=KEY_FIELD, match=key_match),
        ]))
    if tables:
        table_match = (qm.MatchValue(value=tables[0]) if len(tables) == 1
                       else qm.MatchAny(any=list(tables)))
        parts.append(qm.Filter(must=[qm.FieldCondition(key=TABLE_FIELD, match=table_match)]))
    return parts[0] if len(parts) == 1 else qm.Filter(should=parts)


def _batches(items: Sequence[Any], size: int = FILTER_BATCH) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def public_metadata(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The stored payload minus LlamaIndex internals and the text field."""
    return {k: v for k, v in payload.items() if k not in RESERVED_KEYS}


def _describe_vectors(vectors: Any) -> str:
    if isinstance(vectors, dict):
        parts = [f"{name!r}: size={p.size} distance={p.distance.value}" for name, p in vectors.items()]
        return "named vectors {" + ", ".join(parts) + "}"
    if vectors is None:
        return "no dense vectors"
    return f"unnamed vector size={vectors.size} distance={vectors.distance.value}"


class DocumentStore:
    def __init__(self, settings: Settings, embed_model: OnnxMiniLMEmbedding) -> None:
        self.settings = settings
        self.embed_model = embed_model
        self.collection = settings.collection
        if settings.server_mode:
            self.client = QdrantClient(
                url=settings.qdrant_url,
                api_key=settings.qdrant_api_key,
                timeout=settings.qdrant_timeout,
            )
        else:
            # Local on-disk mode takes an exclusive lock on the path (one process per path).
            self.client = QdrantClient(path=settings.qdrant_path)
        # Writes are serialised (an upsert is "add, then delete surplus" and must not interleave
        # with another write of the same key). The local client is not thread-safe: serialise all.
        self._write_lock = threading.RLock()
        self._read_lock = self._write_lock if not settings.server_mode else None
        self._init_lock = threading.Lock()
        self._vector_store: Optional[CdcQdrantVectorStore] = None
        self._index: Optional[VectorStoreIndex] = None

    # ------------------------------------------------------------------ setup

    def _expected(self) -> str:
        return f"named vectors {{'{VECTOR_NAME}': size={VECTOR_SIZE} distance=Cosine}}"

    def _check_collection(self) -> None:
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        params = vectors.get(VECTOR_NAME) if isinstance(vectors, dict) else None
        if params is None or params.size != VECTOR_SIZE or params.distance != qm.Distance.COSINE:
            raise CollectionConfigError(
                f"Qdrant collection {self.collection!r} has {_describe_vectors(vectors)}, "
                f"but this service needs {self._expected()}; use another "
                f"PYTHON_INDEXER_COLLECTION or delete the collection"
            )
        if self.settings.server_mode:
            schema = info.payload_schema or {}
            for name in (TABLE_FIELD, KEY_FIELD):
                if name not in schema:
                    self.client.create_payload_index(
                        self.collection, field_name=name,
                        field_schema=qm.PayloadSchemaType.KEYWORD, wait=True,
                    )

    def _create_collection(self) -> None:
        log.info("creating Qdrant collection %r (%s)", self.collection, self._expected())
        try:
            self.client.create_collection(
                self.collection,
                vectors_config={
                    VECTOR_NAME: qm.VectorParams(size=VECTOR_SIZE, distance=qm.Distance.COSINE)
                },
            )
        except Exception as exc:  # a concurrent creator won the race
            if "already exists" not in str(exc):
                raise
        if self.settings.server_mode:  # local mode has no payload indexes
            for name in (TABLE_FIELD, KEY_FIELD):
                self.client.create_payload_index(
                    self.collection, field_name=name,
                    field_schema=qm.PayloadSchemaType.KEYWORD, wait=True,
                )

    def ensure_ready(self) -> None:
        """Create/validate the collection and the LlamaIndex objects (idempotent).

        Raises CollectionConfigError (fatal) or StoreUnavailable (transient).
        """
        if self._index is not None:
            return
        with self._init_lock, self._write_lock:
            if self._index is not None:
                return
            try:
                if not self.client.collection_exists(self.collection):
                    self._create_collection()
                self._check_collection()
                vector_store = CdcQdrantVectorStore(
                    collection_name=self.collection,
                    client=self.client,
                    dense_vector_name=VECTOR_NAME,
                    text_key=TEXT_KEY,
                    batch_size=64,
                )
            except CollectionConfigError:
                raise
            except Exception as exc:
                raise StoreUnavailable(f"vector store unavailable: {exc}") from exc
            if vector_store.dense_vector_name != VECTOR_NAME:  # LlamaIndex legacy detection
                raise CollectionConfigError(
                    f"collection {self.collection!r} was detected as legacy "
                    f"(dense vector {vector_store.dense_vector_name!r}), expected {VECTOR_NAME!r}"
                )
            self._vector_store = vector_store
            self._index = VectorStoreIndex.from_vector_store(
                vector_store, embed_model=self.embed_model
            )

    def health(self) -> None:
        self.ensure_ready()
        with self._reading():
            try:
                self.client.get_collection(self.collection)
            except Exception as exc:
                raise StoreUnavailable(f"vector store unavailable: {exc}") from exc

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # pragma: no cover - best effort on shutdown
            pass

    def _reading(self):
        return self._read_lock if self._read_lock is not None else _NullLock()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CollectionConfigError, StoreUnavailable):
            raise
        except Exception as exc:
            log.warning("vector store error during %s: %s", what, exc)
            raise StoreUnavailable(f"vector store error during {what}: {exc}") from exc

    # ------------------------------------------------------------------ writes

    def upsert(self, documents: Sequence[Document]) -> int:
        """Replace all nodes of each (table, key) with its chunks. Returns the chunk count."""
        self.ensure_ready()
        assert self._vector_store is not None

        missing = [c for d in documents for c in d.chunks if c.embedding is None]
        if missing:
            vecs, _ = self.embed_model.embed_with_usage([c.text for c in missing])
            for chunk, vec in zip(missing, vecs):
                chunk.embedding = vec.tolist()

        nodes: List[TextNode] = []
        for doc in documents:
            for position, chunk in enumerate(doc.chunks):
                metadata = dict(chunk.metadata)
                cdc = dict(metadata.get(CDC) or {})
                cdc["table"] = doc.table
                cdc["key"] = doc.key
                cdc.setdefault("chunk", position)
                metadata[CDC] = cdc
                nodes.append(
                    TextNode(
                        id_=chunk.id,
                        text=chunk.text,
                        metadata=metadata,
                        embedding=chunk.embedding,
                        relationships={
                            NodeRelationship.SOURCE: RelatedNodeInfo(
                                node_id=f"{doc.table}:{doc.key}"
                            )
                        },
                    )
                )

        with self._write_lock:
            if nodes:
                self._call("upsert", self._vector_store.add, nodes)
            # Remove what the new versions no longer have: points of these keys whose id was
            # not just written. (Ids are unique across the request, so a point carrying one of
            # the new ids now has the payload of the document that wrote it.)
            for batch in _batches(list(documents)):
                flt = _keys_filter([(d.table, d.key) for d in batch])
                new_ids = [c.id for d in batch for c in d.chunks]
                if new_ids:
                    flt = qm.Filter(must=[flt], must_not=[qm.HasIdCondition(has_id=new_ids)])
                self._call(
                    "upsert (surplus delete)",
                    self.client.delete,
                    self.collection,
                    points_selector=qm.FilterSelector(filter=flt),
                    wait=True,
                )
        return len(nodes)

    def delete(self, keys: Sequence[Tuple[str, str]], tables: Sequence[str]) -> None:
        self.ensure_ready()
        if not keys and not tables:
            return
        with self._write_lock:
            for start in range(0, max(len(keys), len(tables)), FILTER_BATCH):
                key_batch = keys[start : start + FILTER_BATCH]
                table_batch = tables[start : start + FILTER_BATCH]
                self._call(
                    "delete",
                    self.client.delete,
                    self.collection,
                    points_selector=qm.FilterSelector(filter=_keys_filter(key_batch, table_batch)),
                    wait=True,
                )

    # ------------------------------------------------------------------ reads

    def get(self, keys: Sequence[Tuple[str, str]],
            with_embeddings: bool = False) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
        """Stored chunks per (table, key), sorted by `_cdc.chunk` then id; with their
        vectors under `embedding` when `with_embeddings`."""
        self.ensure_ready()
        found: Dict[Tuple[str, str], List[Dict[str, Any]]] = {k: [] for k in keys}
        for batch in _batches(list(found)):
            flt = _keys_filter(batch)
            offset = None
            while True:
                with self._reading():
                    points, offset = self._call(
                        "get", self.client.scroll, self.collection, scroll_filter=flt,
                        limit=1024, offset=offset, with_payload=True,
                        with_vectors=[VECTOR_NAME] if with_embeddings else False,
                    )
                for p in points:
                    payload = p.payload or {}
                    cdc = payload.get(CDC) or {}
                    slot = found.get((cdc.get("table"), cdc.get("key")))
                    if slot is not None:
                        chunk = {
                            "id": str(p.id),
                            "text": payload.get(TEXT_KEY, ""),
                            "metadata": public_metadata(payload),
                        }
                        if with_embeddings:
                            vectors = p.vector if isinstance(p.vector, dict) else {}
                            vector = vectors.get(VECTOR_NAME)
                            chunk["embedding"] = list(vector) if vector is not None else None
                        slot.append(chunk)
                if offset is None:
                    break

        def order(chunk: Dict[str, Any]):
            pos = (chunk["metadata"].get(CDC) or {}).get("chunk")
            ok = isinstance(pos, (int, float)) and not isinstance(pos, bool)
            return (0 if ok else 1, pos if ok else 0, chunk["id"])

        for chunks in found.values():
            chunks.sort(key=order)
        return found

    def scan(self, table: Optional[str], keys: Optional[Sequence[Tuple[str, str]]],
             after: Optional[str], limit: int) -> Tuple[List[Dict[str, Any]], Optional[str]]:
        """One page of the points of `table` (or of the documents `keys`), in point-id order:
        each point's id and its `_cdc` metadata only (`hidden`/`moved_row` left out: they hold
        whole column values). Returns the points and the id the next page starts at."""
        self.ensure_ready()
        if keys is not None:
            if not keys:
                return [], None
            flt = _keys_filter(list(dict.fromkeys(keys)))
        else:
            flt = _doc_filter(table)
        with self._reading():
            points, offset = self._call(
                "scan", self.client.scroll, self.collection, scroll_filter=flt,
                limit=limit, offset=after, with_payload=[CDC], with_vectors=False,
            )
        out = []
        for p in points:
            cdc = dict((p.payload or {}).get(CDC) or {})
            cdc.pop("hidden", None)
            cdc.pop("moved_row", None)
            out.append({"id": str(p.id), "metadata": {CDC: cdc}})
        return out, (str(offset) if offset is not None else None)

    def count(self, table: Optional[str] = None) -> int:
        self.ensure_ready()
        flt = _doc_filter(table) if table is not None else None
        with self._reading():
            res = self._call("count", self.client.count, self.collection, count_filter=flt, exact=True)
        return res.count

    def search(
        self,
        query: Optional[str],
        embedding: Optional[List[float]],
        limit: int,
        table: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """LlamaIndex retrieval (VectorIndexRetriever over the QdrantVectorStore)."""
        self.ensure_ready()
        assert self._index is not None
        filters = (
            MetadataFilters(filters=[MetadataFilter(key=TABLE_FIELD, value=table)])
            if table is not None else None
        )
        retriever = self._index.as_retriever(similarity_top_k=limit, filters=filters)
        if embedding is None:
            # Embed outside the store lock.
            embedding = self.embed_model.get_query_embedding(query or "")
        bundle = QueryBundle(query_str=query or "", embedding=embedding)
        with self._reading():
            hits = self._call("search", retriever.retrieve, bundle)
        results = [
            {
                "id": h.node.node_id,
                "score": float(h.score) if h.score is not None else 0.0,
                "text": h.node.get_content(),
                "metadata": dict(h.node.metadata),
            }
            for h in hits
        ]
        results.sort(key=lambda r: r["score"], reverse=True)
        return results


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
