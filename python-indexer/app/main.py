"""FastAPI application: `python -m uvicorn app.main:app --host 127.0.0.1 --port 8090`."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .api import check_auth, error_body, install_error_handlers, router
from .config import Settings
from .embedding import OnnxMiniLMEmbedding
from .store import DocumentStore, StoreUnavailable

log = logging.getLogger("python_indexer")


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings: Settings = app.state.settings
    log.info("starting python-indexer: %s", settings.describe())
    t0 = time.monotonic()
    embed_model = OnnxMiniLMEmbedding(
        settings.model_dir, threads=settings.ort_threads, embed_batch_size=settings.embed_batch_size
    )
    log.info("embedding model loaded in %.2fs", time.monotonic() - t0)
    store = DocumentStore(settings, embed_model)
    try:
        store.ensure_ready()  # CollectionConfigError propagates: refuse to start
    except StoreUnavailable as exc:
        log.warning("vector store not reachable yet (will retry on demand): %s", exc)
    app.state.embed_model = embed_model
    app.state.store = store
    try:
        yield
    finally:
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="python-indexer", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings or Settings.from_env()
    install_error_handlers(app)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        denied = check_auth(request)
        if denied is not None:
            return denied
        return await call_next(request)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        limit = request.app.state.settings.max_body_bytes
        length = request.headers.get("content-length")
        if limit and length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(
                error_body(
                    f"request body of {length} bytes is larger than {limit} "
                    "(PYTHON_INDEXER_MAX_BODY_BYTES)",
                    code="request_too_large",
                ),
                status_code=413,
            )
        return await call_next(request)

    app.include_router(router)
    return app


app = create_app()
