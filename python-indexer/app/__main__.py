"""`python -m app`: run the service with uvicorn on PYTHON_INDEXER_HOST:PYTHON_INDEXER_PORT."""

import os

import uvicorn


def main() -> None:
    uvicorn.run(
        "app.main:app",
        host=os.environ.get("PYTHON_INDEXER_HOST", "127.0.0.1"),
        port=int(os.environ.get("PYTHON_INDEXER_PORT", "8090")),
        workers=1,  # local Qdrant mode allows one process per path
    )


if __name__ == "__main__":
    main()
