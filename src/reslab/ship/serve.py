"""``reslab serve RUN``: a small HTTP server for a trained model (FastAPI + uvicorn: ``pip install "reslab[serve]"``).

``POST /predict`` (multipart field ``file``) answers the top-k classes as JSON, ``GET /health`` says what is loaded and
how many requests and batches it has served, ``GET /`` is a one-page upload form. Requests that arrive together are
answered by one forward pass (up to ``max_batch`` images, waiting at most ``batch_wait_ms`` for company). Each image is
read exactly as ``reslab predict`` reads a file, so the answers are the same. Uploads are bounded in size and decode
time; a non-image, an oversized or a truncated upload gets a 4xx with one line, never a crash.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time, and they
# name types of the fastapi module imported inside create_app.
import asyncio
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError, first_line
from ..core.execution import autocast, prepare
from ..data import load_rgb
from ..data.folder import check_pixels, decode_bytes
from ..inference.predict import ModelInput, inference_model, to_layout, top_rows


def _fastapi():
    try:
        import fastapi
        import multipart  # noqa: F401  (python-multipart: FastAPI needs it for uploads)
        import uvicorn
    except ImportError:
        raise UserError("reslab serve needs FastAPI, uvicorn and python-multipart: pip install 'reslab[serve]'") \
            from None
    return fastapi, uvicorn


class Batcher:
    """Collects the images of requests that arrive together and answers them with one forward pass."""

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str, max_batch: int,
                 wait_ms: float) -> None:
        self.net, self.device, self.precision = net, device, precision
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = self.batches = 0
        self.model = ThreadPoolExecutor(1, thread_name_prefix="reslab-model")  # one forward pass at a time

    async def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((x, done))
        return await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            xs = torch.stack([x for x, _ in batch])
            try:
                probs = await loop.run_in_executor(self.model, self._forward, xs)
            except Exception as exc:  # answered as a 500 with one line, the server keeps serving
                for _, done in batch:
                    done.set_exception(exc)
                continue
            self.requests, self.batches = self.requests + len(batch), self.batches + 1
            for (_, done), p in zip(batch, probs):
                if not done.cancelled():
                    done.set_result(p)

    @torch.no_grad()
    def _forward(self, xs: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.net(to_layout(xs.to(self.device), self.net)).float().softmax(1).cpu()


def create_app(model: str | Path, *, topk: int = 5, device: str = "auto", precision: str = "fp32",
               max_batch: int = 16, batch_wait_ms: float = 5.0, max_upload_mb: float = 10.0,
               decode_timeout: float = 5.0, decode_memory_mb: float = 1024.0, runtime: str = "eager"):
    """The FastAPI application serving ``model`` (a run directory, ``model.safetensors`` or ``last.pt``) in
    ``runtime`` (``eager``, ``onnx``, ``onnx-int8``: see ``reslab.predict.inference_model``). ``decode_memory_mb``:
    the memory the images being decoded at once may take (an upload that alone needs more is refused)."""
    fastapi, _ = _fastapi()
    from fastapi.responses import HTMLResponse

    check_options(topk=topk, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb,
                  decode_timeout=decode_timeout, decode_memory_mb=decode_memory_mb)
    dev, prec = prepare(device, precision)
    net, meta = inference_model(model, runtime, device=dev, precision=prec)
    model_input, classes = ModelInput(meta), meta["classes"]
    batcher = Batcher(net, dev, prec, max_batch, batch_wait_ms)
    uploads = Uploads(model_input, max_upload_mb, decode_timeout, decode_memory_mb)

    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = fastapi.FastAPI(title="reslab", lifespan=lifespan)
    _one_line_errors(app)
    app.add_middleware(BodyLimit, limit=uploads.limit + 65536,
                       line=f"the upload is larger than --max-upload-mb {max_upload_mb:g}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(model), "arch": meta["arch"], "runtime": runtime, "classes": classes,
                "input_size": model_input.size, "requests": batcher.requests, "batches": batcher.batches}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.replace("{{arch}}", meta["arch"]).replace("{{n}}", str(len(classes)))

    @app.post("/predict")
    async def predict(request: fastapi.Request):
        t0 = time.perf_counter()
        try:
            file = await uploads.form_file(request)
            x = await uploads.image(file)
        except Refused as r:
            return _fail(r.status, str(r))
        try:
            probs = await batcher.probabilities(x)
        except Exception as exc:
            return _fail(500, f"the model failed: {type(exc).__name__}: {first_line(exc)}")
        return {"file": file.filename, "top": top_rows(probs[None], classes, topk)[0],
                "ms": round(1000 * (time.perf_counter() - t0), 2)}

    return app


def _fail(status: int, line: str):
    """Every refusal and failure is one line: ``{"error": line}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": line}, status_code=status)


def _one_line_errors(app) -> None:
    """FastAPI's own answers (``{"detail": ...}``, the 422 object, a crash) as the one-line ``{"error": ...}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return _fail(500, f"the server failed: {type(exc).__name__}: {first_line(exc)}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _fail(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _fail(400, "malformed request: POST /predict takes one image as the multipart field 'file'")


class Refused(Exception):
    """An upload answered with a 4xx: ``status`` and one line."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status = status


class BodyLimit:
    """ASGI middleware: a request body is counted as it arrives and answered 413 once it passes ``limit`` bytes,
    whether or not it declared its length (a chunked upload), so no more than the limit is ever read or spooled."""

    def __init__(self, app, limit: int, line: str) -> None:
        self.app, self.limit, self.line = app, limit, line

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise Refused(413, self.line)  # stops the form parser; answered below
            return message

        async def guarded(message) -> None:
            nonlocal started
            if over:  # whatever the app answers after the refusal (its error for a broken form) is replaced
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        import json

        body = json.dumps({"error": self.line}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class DecodeMemory:
    """Admits decodes while the memory they are estimated to need fits ``limit`` bytes, released when the decode
    ends (not when its request times out: the thread still holds the memory). A few large images wait their turn
    while small ones pass; one that alone needs more than the limit is refused."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.freed = asyncio.Condition()

    async def take(self, cost: int) -> None:
        async with self.freed:
            await self.freed.wait_for(lambda: self.used + cost <= self.limit)
            self.used += cost

    async def give(self, cost: int) -> None:
        async with self.freed:
            self.used -= cost
            self.freed.notify_all()


class Uploads:
    """An upload becomes the model's input as ``reslab predict`` reads a file, bounded in size, in the memory its
    decode takes and in decode time."""

    def __init__(self, model_input: ModelInput, max_upload_mb: float, decode_timeout: float,
                 decode_memory_mb: float = 1024.0) -> None:
        self.input, self.max_mb, self.timeout = model_input, max_upload_mb, decode_timeout
        self.limit = int(max_upload_mb * 1024 * 1024)
        self.memory_mb = decode_memory_mb
        self.memory = DecodeMemory(int(decode_memory_mb * 1024 * 1024))
        self.decoders = ThreadPoolExecutor(4, thread_name_prefix="reslab-decode")

    async def form_file(self, request):
        """The one upload of the multipart form (a second ``file`` part, or none, is a 400)."""
        try:
            form = await request.form(max_files=2, max_fields=16, max_part_size=self.limit)
        except Refused:
            raise
        except Exception as exc:  # a malformed multipart body
            raise Refused(400, f"malformed upload: {first_line(getattr(exc, 'detail', exc))}") from None
        parts = form.getlist("file")
        if len(parts) > 1:
            raise Refused(400, "two 'file' parts in one request: send one image per request")
        return parts[0] if parts and hasattr(parts[0], "read") else None

    async def image(self, file) -> torch.Tensor:
        if file is None:
            raise Refused(400, "no upload: send the image as the multipart field 'file'")
        data = await file.read(self.limit + 1)
        if len(data) > self.limit:
            raise Refused(413, f"the upload is larger than --max-upload-mb {self.max_mb:g}")
        if not data:
            raise Refused(400, "the upload is empty")
        cost = self._cost(data)
        await self.memory.take(cost)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.decoders, self._decode, data)
        job.add_done_callback(lambda _: loop.create_task(self.memory.give(cost)))
        try:
            return await asyncio.wait_for(asyncio.shield(job), self.timeout)
        except TimeoutError:
            raise Refused(408, f"decoding the image took longer than --decode-timeout {self.timeout:g} s") from None
        except Exception as exc:  # PIL's refusal of a non-image, a truncated file
            raise Refused(400, f"not a readable image: {type(exc).__name__}: {first_line(exc)}") from None

    def _cost(self, data: bytes) -> int:
        """The bytes decoding ``data`` will take, read from its header (no pixel is decoded here)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(im)
                cost = decode_bytes(im, self.input.keep)
        except UserError as exc:
            raise Refused(413, str(exc)) from None
        except Exception as exc:
            raise Refused(400, f"not a readable image: {type(exc).__name__}: {first_line(exc)}") from None
        if cost > self.memory.limit:
            raise Refused(413, f"decoding this image would take about {cost / 2**20:.0f} MB, more than "
                               f"--decode-memory-mb {self.memory_mb:g}")
        return cost

    def _decode(self, data: bytes) -> torch.Tensor:
        return self.input(load_rgb(io.BytesIO(data), min_side=self.input.keep))


def check_options(**options: float) -> None:
    """The server's limits, range-checked before anything loads (one line)."""
    low = {"topk": 1, "max_batch": 1, "batch_wait_ms": 0}
    for name, value in options.items():
        if (name in low and value < low[name]) or (name not in low and not value > 0):
            bound = f"at least {low[name]}" if name in low else "positive"
            raise UserError(f"--{name.replace('_', '-')} must be {bound}, got {value:g}")


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer than ``seconds``.

    A client that opens connections and sends its headers a byte at a time ("slowloris") would otherwise hold each
    connection for ever (uvicorn times out only idle keep-alive connections). The clock starts when the connection
    opens and again after every response; it stops when the headers are in. A slow *body* is bounded by the upload
    limit, not by this clock (nginx's client_header_timeout is the same idea).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _headers_late(self) -> None:
            # IDLE: h11 has not yet parsed a whole request head on this connection since the clock started.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                line = f'{{"error": "request headers took longer than --header-timeout {seconds:g} s"}}'.encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(line), line))
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeout


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = 10.0,
          **options: Any) -> None:
    """Serve ``model`` over HTTP until interrupted (see ``create_app`` for the options).

    ``header_timeout``: seconds a connection may take to send its request line and headers (408 and closed beyond).
    """
    _, uvicorn = _fastapi()
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0-65535, got {port}")
    check_options(header_timeout=header_timeout)
    app = create_app(model, **options)
    try:  # bound here, so that a port in use is one line and the address printed is one that answers
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=header_timeout_protocol(header_timeout)))
    print(f"serving {model} on http://{host}:{port}  (POST /predict with a multipart 'file', GET /health, "
          f"GET / for a form)", flush=True)
    server.run(sockets=[sock])


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reslab: {{arch}}</title>
<style>
body { font: 16px system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; } img { max-width: 100%; max-height: 16rem; display: block; margin: 1rem 0; }
table { border-collapse: collapse; } td { padding: 0.2rem 0.8rem 0.2rem 0; }
.bar { background: #3b6fd4; height: 0.8rem; } #error { color: #b00020; }
</style></head>
<body>
<h1>reslab &middot; {{arch}} &middot; {{n}} classes</h1>
<form id="form"><input id="file" type="file" name="file" accept="image/*" required>
<button type="submit">Classify</button></form>
<img id="preview" alt="" hidden>
<p id="error" role="alert"></p>
<table id="result" aria-live="polite"></table>
<script>
const form = document.getElementById("form"), input = document.getElementById("file");
const preview = document.getElementById("preview"), result = document.getElementById("result");
const error = document.getElementById("error");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.textContent = ""; result.innerHTML = "";
  const file = input.files[0];
  if (!file) return;
  preview.src = URL.createObjectURL(file); preview.hidden = false;
  const body = new FormData(); body.append("file", file);
  const response = await fetch("/predict", { method: "POST", body });
  const answer = await response.json();
  if (!response.ok) { error.textContent = answer.error; return; }
  for (const t of answer.top) {
    const row = result.insertRow();
    row.insertCell().textContent = t.class;
    row.insertCell().textContent = (100 * t.prob).toFixed(1) + " %";
    const bar = document.createElement("div"); bar.className = "bar";
    bar.style.width = Math.max(1, 200 * t.prob) + "px"; row.insertCell().appendChild(bar);
  }
  result.dataset.top = answer.top[0].class;
});
</script>
</body></html>
"""
