"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def train_cli(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``seqrl train --no-progress --set o ...`` in a fresh process, output captured."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *sets],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_when_checkpointed(overrides: list[str], run: Path, step: int, timeout: int = 300) -> None:
    """Start ``seqrl train`` and SIGKILL it as soon as ``run`` has a complete step ``step``
    checkpoint (the run must still be going then)."""
    from seqrl.train import checkpoint as ckpt

    sets = [arg for o in overrides for arg in ("--set", o)]
    victim = subprocess.Popen(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.time() + timeout
    while not (run / "checkpoints" / f"step-{step}" / ckpt.MARKER).exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL


class ExpertsObserver:
    """The top-k indices each MoE experts module actually received (independent of any router
    hooks under test): ``seen`` gets one [tokens, k] tensor per experts call."""

    def __init__(self, model):
        blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
        self.seen = []
        self.handles = [
            b.experts.register_forward_hook(lambda mod, args, out: self.seen.append(args[1]))
            for b in blocks
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


class LocalHub:
    """A stand-in for the Hugging Face Hub on 127.0.0.1, serving the three endpoints an upload
    uses: ``POST /api/repos/create``, ``POST /api/models/<repo>/preupload/<rev>`` (every file
    is a regular git blob, so no LFS or Xet storage is involved) and ``POST
    /api/models/<repo>/commit/<rev>`` (the NDJSON commit, files base64-encoded).

    ``repos[repo_id]`` is ``{"private": bool, "files": {path: bytes}, "commits": [message]}``;
    ``unexpected`` lists any other request. A context manager; ``endpoint`` is the value for
    ``HF_ENDPOINT``.
    """

    def __init__(self):
        import base64
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.repos, self.unexpected = {}, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}"
                    entry = hub.repos.setdefault(repo, {"files": {}, "commits": []})
                    entry["private"] = req.get("visibility") == "private"
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}"})
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo, action = f"{parts[2]}/{parts[3]}", parts[4]
                    if repo not in hub.repos:
                        return self._reply(404, {"error": f"repository {repo} not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                        return self._reply(200, {"files": modes})
                    if action == "commit":
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                hub.repos[repo]["commits"].append(item["value"]["summary"])
                            elif item["key"] == "file":
                                value = item["value"]
                                content = base64.b64decode(value["content"])
                                hub.repos[repo]["files"][value["path"]] = content
                            else:
                                return self._reply(400, {"error": f"unexpected {item['key']}"})
                        url = f"{hub.endpoint}/{repo}/commit/{'0' * 40}"
                        return self._reply(200, {"commitUrl": url, "commitOid": "0" * 40})
                hub.unexpected.append(("POST", self.path))
                return self._reply(404, {"error": f"not served by the stand-in: {self.path}"})

            def do_GET(self):
                hub.unexpected.append(("GET", self.path))
                return self._reply(404, {"error": f"not served by the stand-in: {self.path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


# Reward terms that fail inside a rollout worker (tests/train/test_async.py).
class WorkerBoom(BaseException):
    """Not an Exception: passes through the reward-term guard like an interpreter-level error."""


def reward_that_raises(completion: str, example) -> float:
    return 1 / 0


def reward_that_escapes(completion: str, example) -> float:
    raise WorkerBoom("escaped from a reward term")


def reward_that_exits(completion: str, example) -> float:
    import os

    os._exit(7)
