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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .data import load_rgb
from .errors import UserError, first_line
from .predict import ModelInput, inference_model, to_layout, top_rows
from .runtime import autocast, prepare


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
               decode_timeout: float = 5.0, runtime: str = "eager"):
    """The FastAPI application serving ``model`` (a run directory, ``model.safetensors`` or ``last.pt``) in
    ``runtime`` (``eager``, ``onnx``, ``onnx-int8``: see ``reslab.predict.inference_model``)."""
    fastapi, _ = _fastapi()
    from fastapi.responses import HTMLResponse, JSONResponse

    if topk < 1 or max_batch < 1 or batch_wait_ms < 0 or max_upload_mb <= 0 or decode_timeout <= 0:
        raise UserError("--topk and --max-batch must be at least 1, --batch-wait-ms at least 0, "
                        "--max-upload-mb and --decode-timeout positive")
    dev, prec = prepare(device, precision)
    net, meta = inference_model(model, runtime, device=dev, precision=prec)
    model_input, classes = ModelInput(meta), meta["classes"]
    batcher = Batcher(net, dev, prec, max_batch, batch_wait_ms)
    uploads = Uploads(model_input, max_upload_mb, decode_timeout)
    limit = uploads.limit

    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = fastapi.FastAPI(title="reslab", lifespan=lifespan)

    def fail(status: int, line: str):
        return JSONResponse({"error": line}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: fastapi.Request, exc: Exception):
        return fail(500, f"the server failed: {type(exc).__name__}: {first_line(exc)}")

    @app.middleware("http")
    async def bounded(request: fastapi.Request, call_next):
        # Before the form is parsed (FastAPI reads a whole upload before the endpoint runs): refuse by the header.
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit + 65536:
            return fail(413, f"the upload is larger than --max-upload-mb {max_upload_mb:g}")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(model), "arch": meta["arch"], "runtime": runtime, "classes": classes,
                "input_size": model_input.size, "requests": batcher.requests, "batches": batcher.batches}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.replace("{{arch}}", meta["arch"]).replace("{{n}}", str(len(classes)))

    @app.post("/predict")
    async def predict(file: fastapi.UploadFile | None = fastapi.File(None)):  # noqa: B008 (FastAPI idiom)
        t0 = time.perf_counter()
        try:
            x = await uploads.image(file)
        except Refused as r:
            return fail(r.status, str(r))
        try:
            probs = await batcher.probabilities(x)
        except Exception as exc:
            return fail(500, f"the model failed: {type(exc).__name__}: {first_line(exc)}")
        return {"file": file.filename, "top": top_rows(probs[None], classes, topk)[0],
                "ms": round(1000 * (time.perf_counter() - t0), 2)}

    return app


class Refused(Exception):
    """An upload answered with a 4xx: ``status`` and one line."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status = status


class Uploads:
    """An upload becomes the model's input as ``reslab predict`` reads a file, bounded in size and decode time."""

    def __init__(self, model_input: ModelInput, max_upload_mb: float, decode_timeout: float) -> None:
        self.input, self.max_mb, self.timeout = model_input, max_upload_mb, decode_timeout
        self.limit = int(max_upload_mb * 1024 * 1024)
        self.decoders = ThreadPoolExecutor(2, thread_name_prefix="reslab-decode")

    async def image(self, file) -> torch.Tensor:
        if file is None:
            raise Refused(400, "no upload: send the image as the multipart field 'file'")
        data = await file.read(self.limit + 1)
        if len(data) > self.limit:
            raise Refused(413, f"the upload is larger than --max-upload-mb {self.max_mb:g}")
        if not data:
            raise Refused(400, "the upload is empty")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.decoders, self._decode, data), self.timeout)
        except TimeoutError:
            raise Refused(408, f"decoding the image took longer than --decode-timeout {self.timeout:g} s") from None
        except Exception as exc:  # PIL's refusal of a non-image, a truncated file, a decompression bomb
            raise Refused(400, f"not a readable image: {type(exc).__name__}: {first_line(exc)}") from None

    def _decode(self, data: bytes) -> torch.Tensor:
        return self.input(load_rgb(io.BytesIO(data), min_side=self.input.keep))


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve ``model`` over HTTP until interrupted (see ``create_app`` for the options)."""
    _, uvicorn = _fastapi()
    app = create_app(model, **options)
    print(f"serving {model} on http://{host}:{port}  (POST /predict with a multipart 'file', GET /health, "
          f"GET / for a form)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
