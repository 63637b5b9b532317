"""Fixtures that run the REAL service: uvicorn as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import httpx
import pytest

SERVICE_DIR = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, tmp: Path, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"service-{self.port}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("QDRANT_URL", "QDRANT_API_KEY", "PYTHON_INDEXER_API_KEY")}
        env.update({
            "PYTHON_INDEXER_QDRANT_PATH": str(tmp / "qdrant"),
            "PYTHON_INDEXER_COLLECTION": "test_documents",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=SERVICE_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.base_url + "/healthz", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not healthy after {STARTUP_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("svc"))
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def auth_service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("svc-auth"),
                  {"PYTHON_INDEXER_API_KEY": "test-secret-key-123"})
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()
