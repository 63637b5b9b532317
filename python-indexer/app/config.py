"""Service configuration, read from environment variables (see README.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# python-indexer/app/config.py -> repo root is two levels above python-indexer/app.
REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_SUBDIR = "all-minilm-l6-v2"
VECTOR_NAME = "text"
VECTOR_SIZE = 384


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


@dataclass(frozen=True)
class Settings:
    qdrant_url: Optional[str]
    qdrant_api_key: Optional[str]
    qdrant_path: str
    collection: str
    models_dir: Path
    api_key: Optional[str]
    embed_batch_size: int
    ort_threads: int
    qdrant_timeout: int
    # Requests with a larger body are refused with 413 (a bound on what one request may
    # hold in memory); the daemon then writes the batch in halves.
    max_body_bytes: int = 32 * 1024 * 1024
    # Longer embedding inputs are refused with 400, as hosted providers refuse inputs beyond
    # their context (0: no limit).
    max_input_chars: int = 0

    @property
    def model_dir(self) -> Path:
        return self.models_dir / MODEL_SUBDIR

    @property
    def server_mode(self) -> bool:
        return self.qdrant_url is not None

    @classmethod
    def from_env(cls) -> "Settings":
        models = _env("CDC_INDEXER_MODELS")
        return cls(
            qdrant_url=_env("QDRANT_URL"),
            qdrant_api_key=_env("QDRANT_API_KEY"),
            qdrant_path=_env("PYTHON_INDEXER_QDRANT_PATH") or "./data/qdrant-local",
            collection=_env("PYTHON_INDEXER_COLLECTION") or "cdc_documents",
            models_dir=Path(models) if models else REPO_ROOT / ".models",
            api_key=_env("PYTHON_INDEXER_API_KEY"),
            embed_batch_size=int(_env("PYTHON_INDEXER_EMBED_BATCH_SIZE") or 32),
            ort_threads=int(_env("PYTHON_INDEXER_ORT_THREADS") or 0),
            qdrant_timeout=int(_env("PYTHON_INDEXER_QDRANT_TIMEOUT") or 10),
            max_body_bytes=int(_env("PYTHON_INDEXER_MAX_BODY_BYTES") or 32 * 1024 * 1024),
            max_input_chars=int(_env("PYTHON_INDEXER_MAX_INPUT_CHARS") or 0),
        )

    def describe(self) -> str:
        """A log-safe summary (never includes API keys)."""
        where = f"server {self.qdrant_url}" if self.server_mode else f"local path {self.qdrant_path}"
        return (
            f"qdrant={where} collection={self.collection} model_dir={self.model_dir} "
            f"auth={'on' if self.api_key else 'off'}"
        )
