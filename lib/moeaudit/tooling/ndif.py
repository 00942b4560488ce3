"""A stand-in for an NDIF server, in-process or on the loopback interface, for testing remote execution offline.

What a server does with a request (nnsight 0.8.1's protocol): deserialise the trace with the
client's own modules absent (only what the request carries by value, plus torch, transformers and
nnsight), run it against the model it holds, and send back only the values the trace marked with
``.save()``, as ``torch.save`` bytes. :func:`execute_request` does exactly that;
:class:`InProcessServer` is an nnsight backend that sends every trace of a wrapper
(:func:`moeaudit.models.remote_wrapper`, attribute ``server``) through it and counts requests and
bytes; ``python -m moeaudit.tooling.ndif serve`` answers nnsight's HTTP client on 127.0.0.1
(``POST /request``, ``GET /response/{id}``, ``GET /result/{id}``, ``GET /status``, and the ``/subscribe``
websocket that the client's default blocking mode waits on: the session id, then each job's final
status, as text frames of RFC 6455).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import linecache
import queue
import sys
import threading
import uuid
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.backend import Backend
from nnsight.tracing.tracer import _saves, dec, inc, mark
from nnsight.tracing.util import push

from ..models import load_model, remote_wrapper, without_grad


def execute_request(blob: bytes, model, *, compress: bool = False) -> dict:
    """Run one serialised trace (``RequestModel.serialize`` bytes) on ``model`` (an nnsight wrapper
    holding the weights) as a server does: deserialised with every module that is not part of the
    server's environment hidden (nnsight's ``LocalSimulationBackend`` rules), executed as the
    outermost trace, and only its saved values returned (``{name: value}``). Errors of the trace
    propagate."""
    hider = LocalSimulationBackend(model)
    lines = dict(linecache.cache)  # deserialising registers the block's source under the client's file name
    hidden = hider._hide_local_modules()
    try:
        tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress=compress)
    finally:
        hider._restore(hidden)
        linecache.cache.clear()  # in-process, that entry would corrupt later source lookups of that file
        linecache.cache.update(lines)
    inc()
    try:
        with torch.enable_grad():  # a server's autograd mode, not the caller's torch.no_grad
            tracer.execute(tracer.info.code)
        saves = _saves()
        return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
    finally:
        dec()


def result_bytes(saves: dict) -> bytes:
    """The saved values as the server sends them (``torch.save``, pickle protocol 4)."""
    with io.BytesIO() as f:
        torch.save(saves, f, pickle_protocol=4)
        return f.getvalue()


class InProcessServer(Backend):
    """An nnsight backend that serialises each trace, runs it through :func:`execute_request` on
    ``model`` and pushes only the returned saved values into the caller's frame, as nnsight's remote
    client does. ``requests`` counts the traces, ``request_bytes``/``result_bytes`` the bytes each way
    (uncompressed)."""

    def __init__(self, model):
        self.model = model
        self.requests, self.request_bytes, self.result_bytes = 0, [], []

    def __call__(self, tracer) -> None:
        blob = RequestModel.serialize(tracer, compress=False)
        data = result_bytes(execute_request(blob, self.model))
        self.requests += 1
        self.request_bytes.append(len(blob))
        self.result_bytes.append(len(data))
        saves = without_grad(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False))
        for value in saves.values():
            mark(value)
        push(tracer.info.frame, saves)

    def attach(self, wrapper):
        """Make this server answer every remote trace of ``wrapper`` (:func:`remote_wrapper`); returns self."""
        wrapper.server = lambda _model: self
        return self


#: RFC 6455, section 1.3: the key a server appends to ``Sec-WebSocket-Key`` before hashing it
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455, section 4.2.2):
    base64 of the SHA-1 of the key followed by :data:`WEBSOCKET_GUID`."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()


def websocket_text_frame(text: str) -> bytes:
    """One unmasked, final text frame (RFC 6455, section 5.2) carrying ``text`` (UTF-8), as a server
    sends it: opcode byte ``0x81``, then the payload length in 7 bits, or 126 and 16 bits, or 127
    and 64 bits (big-endian), then the payload."""
    data = text.encode()
    n = len(data)
    if n < 126:
        head = bytes([0x81, n])
    elif n < 1 << 16:
        head = bytes([0x81, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 127]) + n.to_bytes(8, "big")
    return head + data


class _Handler(BaseHTTPRequestHandler):
    server_version = "moeaudit-ndif-stub/1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _subscribe(self):
        """The blocking client's websocket: send its session id, then the final status of its job."""
        state, session = self.server.state, uuid.uuid4().hex
        updates = state["sessions"][session] = queue.Queue()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket_accept(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(websocket_text_frame(json.dumps({"session_id": session})))
            self.wfile.flush()
            while True:
                response = updates.get(timeout=600)
                self.wfile.write(websocket_text_frame(response.model_dump_json()))
                self.wfile.flush()
                if response.status in (Status.COMPLETED, Status.ERROR):
                    return None
        except (queue.Empty, OSError):
            return None
        finally:
            state["sessions"].pop(session, None)

    def do_GET(self):  # noqa: N802
        state = self.server.state
        if self.path == "/subscribe" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._subscribe()
        if self.path == "/status":
            body = {"deployments": {state["repo_id"]: {"repo_id": state["repo_id"], "deployment_level": "HOT",
                                                       "application_state": "RUNNING"}}}
            return self._send(200, json.dumps(body).encode())
        if self.path.startswith("/response/"):
            job = state["jobs"].get(self.path.split("/")[-1])
            if job is None:
                return self._send(404, b'{"detail": "unknown job"}')
            return self._send(200, job["response"].model_dump_json().encode())
        if self.path.startswith("/result/"):
            job = state["jobs"].get(self.path.split("/")[-1])
            if job is None or job.get("result") is None:
                return self._send(404, b'{"detail": "no result"}')
            return self._send(200, job["result"], "application/octet-stream")
        return self._send(404, b'{"detail": "not found"}')

    def do_POST(self):  # noqa: N802
        if self.path != "/request":
            return self._send(404, b'{"detail": "not found"}')
        body = self.rfile.read(int(self.headers["Content-Length"]))
        msg = BytesParser().parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.get_payload()}
        meta = RequestModel.model_validate_json(parts["data"])
        state, job_id = self.server.state, uuid.uuid4().hex
        state["jobs"][job_id] = {"response": ResponseModel(id=job_id, status=Status.RECEIVED)}
        state["bytes"].append(len(parts["blob"]))
        self._send(200, state["jobs"][job_id]["response"].model_dump_json().encode())
        with state["lock"]:  # one job at a time, as one model replica runs them
            job = state["jobs"][job_id]
            if meta.model_key.split(":", 1)[-1].find(state["repo_id"]) < 0:
                job["response"] = ResponseModel(id=job_id, status=Status.ERROR,
                                                description=f"model {meta.model_key} is not hosted here")
                if meta.session_id in state["sessions"]:
                    state["sessions"][meta.session_id].put(job["response"])
                return None
            try:
                saves = execute_request(parts["blob"], state["model"], compress=meta.compress)
                data = result_bytes(saves)
                if meta.compress:
                    import zstandard  # noqa: PLC0415

                    data = zstandard.ZstdCompressor(level=6).compress(data)
                job["result"] = data
                host = f"http://127.0.0.1:{self.server.server_address[1]}"
                job["response"] = ResponseModel(id=job_id, status=Status.COMPLETED, data=f"{host}/result/{job_id}")
            except Exception as exc:  # the job's error goes back to the client as its description
                job["response"] = ResponseModel(id=job_id, status=Status.ERROR,
                                                description=f"{type(exc).__name__}: {exc}")
            finally:
                if meta.session_id in state["sessions"]:  # a blocking client waits on its websocket
                    state["sessions"][meta.session_id].put(job["response"])
        return None


def serve(model_name: str, repo_id: str, *, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP stand-in for NDIF on 127.0.0.1 (``port`` 0: a free one) that runs the requests of
    ``repo_id`` on ``model_name`` loaded here (:func:`moeaudit.models.load_model`). Call
    ``serve_forever()`` on the result; ``server_address[1]`` is the port."""
    model = load_model(model_name)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    httpd.state = {"model": remote_wrapper(model.hf, tokenizer=model.tokenizer), "repo_id": repo_id, "jobs": {},
                   "lock": threading.Lock(), "bytes": [], "sessions": {}}
    return httpd


def main(argv=None) -> int:
    """``python -m moeaudit.tooling.ndif serve MODEL REPO_ID [--port N]``: answer nnsight's remote client on
    127.0.0.1 for ``REPO_ID`` with ``MODEL`` (a shipped name or directory); prints the port, then serves."""
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m moeaudit.tooling.ndif")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="a loopback stand-in for NDIF")
    s.add_argument("model")
    s.add_argument("repo_id")
    s.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    httpd = serve(args.model, args.repo_id, port=args.port)
    print(httpd.server_address[1], flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
