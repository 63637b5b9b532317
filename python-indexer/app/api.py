"""HTTP API: documents (upsert/delete/get/count), search, OpenAI-compatible embeddings."""

from __future__ import annotations

import base64
import hmac
import json
import math
import uuid
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from .config import VECTOR_SIZE
from .embedding import MODEL_NAME
from .store import CDC, RESERVED_KEYS, Chunk, CollectionConfigError, Document, StoreUnavailable

MAX_EMBED_INPUTS = 2048
MAX_SEARCH_LIMIT = 100
MAX_SCAN_LIMIT = 10000


# --------------------------------------------------------------------------- errors

def error_body(message: str, type_: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def install_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_request: Request, exc: StoreUnavailable):
        return JSONResponse(
            error_body(str(exc), "service_unavailable", code="vector_store_unavailable"),
            status_code=503,
        )

    @app.exception_handler(CollectionConfigError)
    async def _config(_request: Request, exc: CollectionConfigError):
        return JSONResponse(
            error_body(str(exc), "service_unavailable", code="collection_config"),
            status_code=503,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        if len(errors) > 5:
            parts.append(f"... and {len(errors) - 5} more")
        body = error_body("; ".join(parts) or "invalid request", code="validation_error")
        body["detail"] = errors
        return JSONResponse(body, status_code=422)


# --------------------------------------------------------------------------- auth

def check_auth(request: Request) -> Optional[JSONResponse]:
    """None if allowed; a 401 response otherwise. Only /v1 routes are protected."""
    expected = request.app.state.settings.api_key
    if not expected or not request.url.path.startswith("/v1"):
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
        return None
    return JSONResponse(
        error_body("Missing or invalid API key (expected 'Authorization: Bearer <key>')",
                   code="invalid_api_key"),
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


# --------------------------------------------------------------------------- models

class ChunkIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    text: str
    embedding: Optional[List[float]] = None
    metadata: Optional[Dict[str, Any]] = None

    @field_validator("id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except (ValueError, AttributeError):
            raise ValueError(f"chunk id must be a UUID string, got {v!r}")

    @field_validator("embedding")
    @classmethod
    def _embedding(cls, v: Optional[List[float]]) -> Optional[List[float]]:
        if v is None:
            return v
        if len(v) != VECTOR_SIZE:
            raise ValueError(f"embedding must have {VECTOR_SIZE} dimensions, got {len(v)}")
        if not all(math.isfinite(x) for x in v):
            raise ValueError("embedding contains a non-finite value")
        if not any(v):
            raise ValueError("embedding is all zeros (undefined for cosine distance)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if v is None:
            return v
        clash = sorted(RESERVED_KEYS & v.keys())
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved")
        if CDC in v and v[CDC] is not None and not isinstance(v[CDC], dict):
            raise ValueError(f"metadata.{CDC} must be an object")
        return v


class DocKey(BaseModel):
    model_config = ConfigDict(extra="ignore")
    table: str = Field(min_length=1)
    key: str = Field(min_length=1)


class DocumentIn(DocKey):
    chunks: List[ChunkIn]

    @model_validator(mode="after")
    def _unique_ids(self):
        ids = [c.id for c in self.chunks]
        if len(ids) != len(set(ids)):
            raise ValueError("chunk ids must be unique within a document")
        return self


class UpsertRequest(BaseModel):
    documents: List[DocumentIn]


class DeleteRequest(BaseModel):
    keys: Optional[List[DocKey]] = None
    tables: Optional[List[str]] = None

    @field_validator("tables")
    @classmethod
    def _tables(cls, v):
        if v is not None and any(not t for t in v):
            raise ValueError("table names must be non-empty")
        return v


class GetRequest(BaseModel):
    keys: List[DocKey]
    # Also return each chunk's stored vector (`embedding`): a metadata-only update can then
    # re-send the chunk without re-embedding it.
    with_embeddings: bool = False


class ScanRequest(BaseModel):
    """One page of a table's points (or of some documents' points), in point-id order."""
    table: Optional[str] = Field(default=None, min_length=1)
    keys: Optional[List[DocKey]] = None
    after: Optional[str] = None
    limit: int = Field(default=256, ge=1, le=MAX_SCAN_LIMIT)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.table is None) == (self.keys is None):
            raise ValueError("give exactly one of 'table' or 'keys'")
        if self.after is not None:
            try:
                self.after = str(uuid.UUID(self.after))
            except ValueError:
                raise ValueError(f"'after' must be a point id (UUID), got {self.after!r}")
        return self


class CountRequest(BaseModel):
    table: Optional[str] = None


class SearchRequest(BaseModel):
    query: Optional[str] = None
    embedding: Optional[List[float]] = None
    limit: int = Field(default=5, ge=1, le=MAX_SEARCH_LIMIT)
    table: Optional[str] = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.query is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'query' or 'embedding'")
        if self.embedding is not None:
            ChunkIn._embedding(self.embedding)
        return self


# --------------------------------------------------------------------------- routes

router = APIRouter()


def _store(request: Request):
    return request.app.state.store


@router.get("/healthz")
def healthz(request: Request):
    store = _store(request)
    try:
        store.health()
    except (StoreUnavailable, CollectionConfigError) as exc:
        return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
    return {"status": "ok", "collection": store.collection, "vector_size": VECTOR_SIZE}


@router.post("/v1/documents:upsert")
def upsert_documents(body: UpsertRequest, request: Request):
    # A key repeated within one request: the last occurrence wins.
    latest: Dict[tuple, DocumentIn] = {}
    for doc in body.documents:
        latest.pop((doc.table, doc.key), None)
        latest[(doc.table, doc.key)] = doc
    owner: Dict[str, tuple] = {}
    docs: List[Document] = []
    for (table, key), doc in latest.items():
        for c in doc.chunks:
            if owner.setdefault(c.id, (table, key)) != (table, key):
                raise ApiError(422, f"chunk id {c.id} is used by two documents in one request",
                               param="documents", code="validation_error")
        docs.append(Document(table, key, [
            Chunk(c.id, c.text, dict(c.metadata or {}), c.embedding) for c in doc.chunks
        ]))
    return {"upserted": _store(request).upsert(docs)}


@router.post("/v1/documents:delete")
def delete_documents(body: DeleteRequest, request: Request):
    keys = list(dict.fromkeys((k.table, k.key) for k in body.keys or []))
    tables = list(dict.fromkeys(body.tables or []))
    _store(request).delete(keys, tables)
    return {"deleted_keys": len(keys), "deleted_tables": len(tables)}


@router.post("/v1/documents:get")
def get_documents(body: GetRequest, request: Request):
    keys = [(k.table, k.key) for k in body.keys]
    found = _store(request).get(keys, with_embeddings=body.with_embeddings)
    return {"documents": [{"table": t, "key": k, "chunks": found[(t, k)]} for t, k in keys]}


@router.post("/v1/documents:scan")
def scan_documents(body: ScanRequest, request: Request):
    keys = [(k.table, k.key) for k in body.keys] if body.keys is not None else None
    points, after = _store(request).scan(body.table, keys, body.after, body.limit)
    return {"points": points, "next": after}


@router.post("/v1/documents:count")
def count_documents(request: Request, body: Optional[CountRequest] = None):
    return {"count": _store(request).count(body.table if body else None)}


@router.post("/v1/search")
def search(body: SearchRequest, request: Request):
    results = _store(request).search(body.query, body.embedding, body.limit, body.table)
    return {"results": results}


def _parse_embeddings_request(raw: bytes, max_input_chars: int = 0) -> Dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_type")
    if "input" not in body:
        raise ApiError(400, "'input' is required", param="input", code="missing_required_parameter")
    inp = body["input"]
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list):
        texts = inp
        if not texts:
            raise ApiError(400, "'input' must not be an empty list", param="input", code="invalid_value")
        if len(texts) > MAX_EMBED_INPUTS:
            raise ApiError(400, f"'input' has {len(texts)} items; at most {MAX_EMBED_INPUTS} are allowed",
                           param="input", code="invalid_value")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ApiError(400, f"input[{i}] must be a string (token arrays are not supported)",
                               param="input", code="invalid_type")
    else:
        raise ApiError(400, "'input' must be a string or an array of strings", param="input",
                       code="invalid_type")
    for i, t in enumerate(texts):
        where = "input" if isinstance(inp, str) else f"input[{i}]"
        if t == "":
            raise ApiError(400, f"{where} is empty", param="input", code="invalid_value")
        if max_input_chars and len(t) > max_input_chars:
            raise ApiError(400, f"{where} has {len(t)} characters; at most {max_input_chars} are allowed",
                           param="input", code="context_length_exceeded")

    model = body.get("model", MODEL_NAME)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format {fmt!r} is not supported (use 'float' or 'base64')",
                       param="encoding_format", code="invalid_value")
    dims = body.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise ApiError(400, "'dimensions' must be an integer", param="dimensions", code="invalid_type")
        if dims != VECTOR_SIZE:
            raise ApiError(400, f"this model only produces {VECTOR_SIZE} dimensions, got dimensions={dims}",
                           param="dimensions", code="invalid_value")
    return {"texts": texts, "model": model, "format": fmt}


def _embeddings_response(embed_model, parsed: Dict[str, Any]) -> Response:
    vecs, tokens = embed_model.embed_with_usage(parsed["texts"])
    data = []
    for i, vec in enumerate(vecs):
        if parsed["format"] == "base64":
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    total = int(sum(tokens))
    body = {
        "object": "list",
        "data": data,
        "model": parsed["model"],
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
    # Serialised here (in the worker thread) with plain json: FastAPI's jsonable_encoder is
    # slow for thousands of floats.
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    parsed = _parse_embeddings_request(
        await request.body(), request.app.state.settings.max_input_chars
    )
    return await run_in_threadpool(_embeddings_response, request.app.state.embed_model, parsed)
