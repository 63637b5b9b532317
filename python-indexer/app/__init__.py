"""python-indexer: a LlamaIndex + Qdrant document index service for cdc-indexer."""
