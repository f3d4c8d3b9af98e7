"""``python -m pipelines.app`` (or ``hfedit-ui``): try an edit in the browser.

Upload a photo or pick a bundled face, choose an attribute, set N, skip and seed, and see the
source, the reconstruction and the edit side by side with their metrics (L1, SSIM, PSNR against
the source; the directional CLIP score when the edit model records its CLIP model and texts),
with a download of the edit. Attributes come from a models folder (``--models``, default the
project's ``models/``: ``backbone/`` + ``edits/<attribute>/``) and, with ``--registry``, from the
edit models registered in MLflow (``<prefix>-edit-<attribute>``, fetched into the cache by
:func:`pipelines.serving.fetch_model`).

Every edit goes through the front door, :class:`hfedit.pipeline.HFEditPipeline`, with the
project's inversion settings (params.yaml) and runtime device: the same code path as ``hfedit
edit``, so the same image, settings, seed and torch thread count (``--threads``) give the same
PNG. Uploads are written into the cache folder and decoded strictly by
:func:`hfedit.data.images.load_image` before they are queued; its refusal (not an image,
truncated, corrupt, too many pixels), with the fix, is what the page shows. The page, the
uploads and the results are served from memory and from the cache folder only: nothing is
written outside ``--cache`` (by default a fresh temporary folder, removed on exit). Jobs run one
at a time in one worker thread, in the order they came (several tabs queue, each sees its place
and a progress bar); the queue is bounded (``--max-queue``) and so is an upload
(``--max-upload-mb``, checked in the page and again by the server).

Why Starlette (+ uvicorn) and not Gradio, the usual library for such demos: no Gradio release
installs beside this project's lock without changing a pinned package. The newest, 6.31.0 (and
6.29-6.30), needs ``pillow<13`` and ``tomlkit<0.15`` (the lock: pillow 13.0.0, and tomlkit 0.15.2
for DVC); earlier ones need ``huggingface-hub<2`` (6.0-6.28, 5.50; the lock: 2.4.0) or
``markupsafe~=2.0`` (4.x, 5.0); the only release pip's resolver accepts, 3.18.0 (2023), fails at
import (``pkg_resources``) and predates Gradio's upload-size limit and its path-traversal fixes.
Starlette 1.10 and uvicorn 0.54 are already in the lock (through fastapi and mlflow), are well
kept (Encode), and are all this page needs: a route per action, a streamed upload with a size
cap, result files served by job id only. The page (``app.html``) is plain HTML and JavaScript
with no external resources, so it works offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.app_jobs import EditService, RequestError

PAGE = Path(__file__).with_name("app.html")


def build_parser(prog: str = "python -m pipelines.app") -> argparse.ArgumentParser:
    """The command line (imports nothing heavy: ``--help`` stays fast)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Try an hfedit edit in the browser: upload a photo or pick a "
        "bundled face, choose an attribute, set N, skip and seed; see source, reconstruction "
        "and edit with their metrics, and download the edit.")
    parser.add_argument("--models", type=Path, default=None,
                        help="pipeline models folder with backbone/ and edits/<attribute>/ "
                             "(default: <project>/models)")
    parser.add_argument("--registry", nargs="?", const="default", default=None, metavar="URI",
                        help="also offer the edit models registered in MLflow; URI = tracking "
                             "URI (default: $MLFLOW_TRACKING_URI, runtime.mlflow.tracking_uri, "
                             "else <project>/mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; the page "
                             "has no login, so bind another address only on a trusted network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for uploads, results and registry downloads (default: a "
                             "new temporary folder, removed on exit)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0,
                        help="largest upload accepted, in MB (default 10)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="jobs waiting at most; more are refused until one finishes "
                             "(default 8)")
    parser.add_argument("--max-steps", type=int, default=1000,
                        help="largest N a page may ask for (default 1000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the edits (default: runtime.torch_threads, "
                             "0 = torch's default); part of the determinism contract")
    parser.add_argument("--device", default=None,
                        help="auto | cpu | cuda | cuda:<i> (default: runtime.device)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a params.yaml key (inversion.eta=1)")
    return parser


# ---------------------------------------------------------------------------------------- web
def create_app(service: EditService):
    """The Starlette app: the page, its JSON API and the result PNGs."""
    import contextlib
    import io

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page = PAGE.read_text()
    thumbs: dict[int, bytes] = {}

    def failed(err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    async def index(request: Request):
        return HTMLResponse(page)

    async def info(request: Request):
        notes = await run_in_threadpool(service.refresh_choices)
        cfg = service.cfg.inversion
        return JSONResponse({
            "attributes": [{"id": c.id, "label": c.label} for c in service.choices.values()],
            "bundled": [{"index": i, "label": name} for i, (name, _) in enumerate(service.bundled)],
            "defaults": {"num_steps": cfg.num_steps, "skip": cfg.skip, "seed": cfg.seed},
            "max_steps": service.max_steps, "max_upload_bytes": service.max_upload,
            "notes": notes})

    async def bundled(request: Request):
        index = request.path_params["index"]
        if not 0 <= index < len(service.bundled):
            return failed(RequestError(404, f"no bundled face {index}"))
        if index not in thumbs:
            buf = io.BytesIO()
            service.bundled[index][1].save(buf, format="PNG")
            thumbs[index] = buf.getvalue()
        return Response(thumbs[index], media_type="image/png")

    async def submit(request: Request):
        q = request.query_params
        try:
            try:
                num_steps, skip, seed = (int(q.get(k, "")) for k in ("num_steps", "skip", "seed"))
            except ValueError:
                raise RequestError(400, "N, skip and seed must be whole numbers") from None
            source = q.get("bundled", "")
            if source:
                if not source.isdigit() or int(source) >= len(service.bundled):
                    raise RequestError(400, f"no bundled face {source!r}")
                face_id, face = service.bundled[int(source)]
                job = service.new_job(q.get("attribute", ""), face_id.replace("/", "_") + ".png",
                                      num_steps, skip, seed)
                await run_in_threadpool(face.save, job.input, format="PNG")
            else:
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > service.max_upload:
                    raise RequestError(413, _too_large(int(declared), service.max_upload))
                job = service.new_job(q.get("attribute", ""), q.get("name", "upload"),
                                      num_steps, skip, seed)
                size = 0
                try:
                    with open(job.input, "wb") as f:
                        async for chunk in request.stream():
                            size += len(chunk)
                            if size > service.max_upload:
                                raise RequestError(413, _too_large(size, service.max_upload))
                            f.write(chunk)
                except BaseException:
                    service.discard(job)
                    raise
                if size == 0:
                    service.discard(job)
                    raise RequestError(400, "no image: choose a file or a bundled face")
            await run_in_threadpool(service.check_input, job)
            position = service.enqueue(job)
        except RequestError as err:
            return failed(err)
        return JSONResponse({"id": job.id, "position": position})

    async def status(request: Request):
        try:
            return JSONResponse(service.status(request.path_params["job"]))
        except RequestError as err:
            return failed(err)

    async def result(request: Request):
        try:
            path, download = service.file(request.path_params["job"], request.path_params["name"])
        except RequestError as err:
            return failed(err)
        return FileResponse(path, media_type="image/png", filename=download,
                            content_disposition_type="inline")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # here, not after uvicorn.run: uvicorn re-raises SIGTERM once stopped

    return Starlette(lifespan=lifespan, routes=[
        Route("/", index),
        Route("/api/info", info),
        Route("/api/bundled/{index:int}.png", bundled),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job}", status),
        Route("/api/jobs/{job}/{name}.png", result),
    ])


def _too_large(size: int, limit: int) -> str:
    return (f"the upload is over {size / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB "
            "(--max-upload-mb): downscale the image or save it as JPEG")


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.app") -> int:
    args = build_parser(prog).parse_args(argv)
    import uvicorn

    from hfedit.config import ConfigError
    from hfedit.device import DeviceUnavailable

    try:
        service = EditService(args)
    except (ConfigError, DeviceUnavailable, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hfedit-ui: {message}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"hfedit-ui: serving on {args.host}: anyone who reaches this address can use the "
              "page (there is no login)", file=sys.stderr)
    print(f"hfedit-ui: {len(service.choices)} attribute(s), cache {service.cache}, torch threads "
          f"{service.threads}, device {service.device}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info",
                    access_log=False, timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0


def run() -> None:
    """The ``hfedit-ui`` console script."""
    sys.exit(main(prog="hfedit-ui"))


if __name__ == "__main__":
    sys.exit(main())
