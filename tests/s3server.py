"""A real S3 protocol server on loopback for the tests: moto's server in a subprocess.

``S3Server`` starts ``python -m moto.server`` on a free port (as s3fs's own tests do),
creates a bucket and gives the options and environment that reach it. ``FaultProxy``
sits between a client and the server and fails chosen requests (a 503 SlowDown or a
dropped connection), to check that transient errors are retried.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "testing"
SECRET = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on 127.0.0.1; ``stop()`` ends it."""

    def __init__(self, bucket: str = "shardsave-test"):
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        for _ in range(3):  # the port may be taken between free_port() and the bind
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.log = tempfile.TemporaryFile()  # noqa: SIM115 - not a pipe: moto logs every request
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(30):
                break
            self.stop()
        else:
            self.log.seek(0)
            raise RuntimeError(f"moto server did not start: {self.log.read()[-2000:]!r}")
        self.client().create_bucket(Bucket=bucket)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1),
            ):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def client(self, service: str = "s3", key: str = KEY, secret: str = SECRET):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=REGION,
        )

    def options(self, endpoint: str | None = None) -> dict:
        """``storage_options`` for shardsave / fsspec."""
        return {"endpoint_url": endpoint or self.endpoint, "key": KEY, "secret": SECRET}

    def env(self, base: dict | None = None) -> dict:
        """An environment whose AWS chain reaches this server (and nothing else)."""
        env = dict(os.environ if base is None else base)
        env.update(
            AWS_ACCESS_KEY_ID=KEY,
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        return env

    def keys(self, prefix: str) -> list[str]:
        """Object keys under ``prefix`` (straight from the server, no cache)."""
        out, kwargs = [], {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self.client().list_objects_v2(**kwargs)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def set_auth(self, enabled: bool) -> None:
        """Make the server check credentials and IAM policies (moto's reset-auth)."""
        req = urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth",
            data=b"0" if enabled else b"inf",
            headers={"Content-Type": "application/octet-stream"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10):
            pass


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """An HTTP proxy to ``target`` that fails the requests it is told to.

    ``faults`` is consumed one entry per request: ``"503"`` answers 503 SlowDown,
    ``"drop"`` closes the connection without an answer, ``None`` forwards.
    """

    def __init__(self, target: str):
        self.target = target.split("://", 1)[1]
        self.faults: list[str | None] = []
        self.injected: list[str] = []
        self.requests = 0
        self.body_bytes_in = 0  # request bodies as sent (chunked framing included)
        self.body_bytes_out = 0  # response bodies
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        line = self.rfile.readline()
                        data += line
                        n = int(line.split(b";")[0], 16)
                        chunk = self.rfile.read(n + 2)
                        data += chunk
                        if n == 0:
                            while chunk not in (b"\r\n", b""):  # trailers
                                chunk = self.rfile.readline()
                                data += chunk
                            return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    proxy.body_bytes_in += len(body)
                    fault = proxy.faults.pop(0) if proxy.faults else None
                    if fault:
                        proxy.injected.append(fault)
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy.lock:
                        proxy.body_bytes_out += len(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
