"""all-MiniLM-L6-v2 (int8 ONNX) sentence embeddings, exposed as a LlamaIndex embedding.

Tokenisation: HF `tokenizers` with tokenizer.json, truncation to 256 tokens, padding to the
longest sequence of each batch. Pooling: mean over the attention mask of `last_hidden_state`,
then L2 normalisation -- the same recipe as the Rust daemon (Mean pooling), so vectors match.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import onnxruntime as ort
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.embeddings import BaseEmbedding
from tokenizers import Tokenizer

MAX_LENGTH = 256
DIMENSIONS = 384
MODEL_NAME = "all-minilm-l6-v2"


class OnnxMiniLM:
    """Tokenizer + ONNX session. Thread-safe (one inference at a time)."""

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        model_path = model_dir / "model.onnx"
        tokenizer_path = model_dir / "tokenizer.json"
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"model file {path} not found (set CDC_INDEXER_MODELS to the directory "
                    f"containing {MODEL_NAME}/, or run scripts/setup-models.sh)"
                )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # tokenizer.json ships with fixed 128 padding/truncation; override both.
        self.tokenizer.enable_truncation(max_length=MAX_LENGTH)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting: the service shares 2 cores with uvicorn, Qdrant and the daemon.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        if out.shape[-1] != DIMENSIONS:
            raise ValueError(f"model output dimension {out.shape[-1]} != {DIMENSIONS}")
        self._lock = threading.Lock()

    def _embed_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, List[int]]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        with self._lock:
            hidden = self.session.run(None, feeds)[0]  # (batch, seq, 384)
        m = mask[:, :, None].astype(np.float32)
        summed = (hidden * m).sum(axis=1)
        counts = np.clip(m.sum(axis=1), 1e-9, None)
        pooled = summed / counts
        norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return (pooled / norms).astype(np.float32), [int(x) for x in mask.sum(axis=1)]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Tuple[np.ndarray, List[int]]:
        """Embed texts; returns (n x 384 float32 unit vectors, token count per text).

        Texts are batched in length order to minimise padding; output order = input order.
        """
        n = len(texts)
        out = np.zeros((n, DIMENSIONS), dtype=np.float32)
        tokens = [0] * n
        if n == 0:
            return out, tokens
        order = sorted(range(n), key=lambda i: len(texts[i]))
        for start in range(0, n, max(1, batch_size)):
            idx = order[start : start + batch_size]
            vecs, counts = self._embed_batch([texts[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = vecs[row]
                tokens[i] = counts[row]
        return out, tokens


class OnnxMiniLMEmbedding(BaseEmbedding):
    """LlamaIndex embedding backed by the local all-MiniLM-L6-v2 ONNX model."""

    _model: OnnxMiniLM = PrivateAttr()

    def __init__(self, model_dir: Path, threads: int = 0, embed_batch_size: int = 32, **kwargs):
        super().__init__(model_name=MODEL_NAME, embed_batch_size=embed_batch_size, **kwargs)
        self._model = OnnxMiniLM(Path(model_dir), threads=threads)

    @classmethod
    def class_name(cls) -> str:
        return "OnnxMiniLMEmbedding"

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    def embed_with_usage(self, texts: Sequence[str]) -> Tuple[np.ndarray, List[int]]:
        return self._model.embed(texts, batch_size=self.embed_batch_size)

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._get_text_embeddings([query])[0]

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        vecs, _ = self._model.embed(texts, batch_size=self.embed_batch_size)
        return vecs.tolist()
