"""A persistent worker process (worker.py) that runs many cases, restarted after a death.

The worker runs under an address-space limit (RLIMIT_AS) and a per-case time limit
(faulthandler's watchdog exits it with the stack of every thread on stderr; the parent
also kills it if even that does not come). Its death is a finding: a signal (SIGSEGV,
SIGABRT...), a hang, or an exit.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerDied(Exception):
    def __init__(self, kind: str, detail: str, op: str, stderr: str):
        super().__init__(f"{kind} {detail} during {op}")
        self.kind, self.detail, self.op, self.stderr = kind, detail, op, stderr


class Worker:
    """One worker process with ``shardsave`` imported from ``target`` (a source tree)."""

    def __init__(
        self,
        target: str = REPO,
        as_limit: int = 3 << 30,
        timeout: float = 20.0,
        rss_bound: int = 512 << 20,
        cwd: str | None = None,
    ):
        self.target, self.timeout = target, timeout
        env = dict(
            os.environ,
            PYTHONPATH=target,
            FUZZ_AS_LIMIT=str(as_limit),
            FUZZ_CASE_TIMEOUT=str(timeout),
            FUZZ_RSS_BOUND=str(rss_bound),
            OMP_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
        )
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (open while the worker lives; close())
        self.proc = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=cwd or tempfile.gettempdir(),
        )
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.ready = self._result("startup", 120.0)

    def run(self, spec_path: str) -> dict:
        """The worker's result for one case; WorkerDied if it died or hung."""
        self.proc.stdin.write(spec_path.encode() + b"\n")
        self.proc.stdin.flush()
        # the worker's own watchdog fires at ``timeout``; this is for when even it cannot
        return self._result("?", self.timeout + max(2.0, min(10.0, self.timeout)))

    def _result(self, op: str, limit: float) -> dict:
        deadline = time.monotonic() + limit
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"@"):
                    op = line[1:].decode("utf-8", "replace")
                elif line.startswith(b"="):
                    return json.loads(line[1:])
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerDied("hang", f"no answer in {limit:.0f} s (killed)", op, self.stderr_tail())
            if self._sel.select(left):
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise self._death(op)
                self._buf += chunk

    def _death(self, op: str) -> WorkerDied:
        code = self.proc.wait()
        err = self.stderr_tail()
        if code < 0:
            return WorkerDied("signal", signal.Signals(-code).name, op, err)
        if "Timeout (" in err:
            return WorkerDied("hang", "per-case time limit (faulthandler)", op, err)
        return WorkerDied("exit", f"exit status {code}", op, err)

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-20000:].decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._sel.close()
        self._stderr.close()


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def crash_site(stderr: str) -> str:
    """The innermost shardsave frame of the thread that crashed or hung, from
    faulthandler's dump: the "Current thread" after a fatal signal; after a timeout, the
    main thread, which it lists last. Innermost frames come first."""
    at = stderr.rfind("Current thread")
    if at >= 0:
        block = stderr[at:]
        end = block.find("\nThread 0x")
        block = block if end < 0 else block[:end]
    else:
        at = stderr.rfind("Thread 0x")
        block = stderr[at:] if at >= 0 else stderr
    frames = _FRAME.findall(block)
    inside = [f for f in frames if f"{os.sep}shardsave{os.sep}" in f[0]]
    for path, line, fn in inside or frames[:1]:
        cut = path.rfind(f"{os.sep}shardsave{os.sep}")
        return f"{path[cut + 1 :] if cut >= 0 else os.path.basename(path)}:{line} in {fn}"
    return "?"
