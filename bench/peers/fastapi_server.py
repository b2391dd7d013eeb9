"""FastAPI peer for `lattice bench`: run with uvicorn, see run_peer.sh."""
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import model_cfg


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]  # flat or nested


class RequestedOutput(BaseModel):
    name: str


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


# By default (strict_content_type) FastAPI does not parse a body sent without a
# Content-Type header as JSON; Lattice and the Flask peer do, and all three must
# take the same request.
app = FastAPI(strict_content_type=False)


@app.exception_handler(RequestValidationError)
async def validation_error(request, exc):
    # The protocol answers bad requests with 400 {"error": ...}, not FastAPI's 422 {"detail": ...}.
    msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": msg}, status_code=400)


# The models are loaded when a worker imports model_cfg, so a worker that answers is ready.
@app.get("/v2/health/live")
@app.get("/v2/health/ready")
def ready():
    return Response(status_code=200)


# A plain `def`: FastAPI runs it in its threadpool, so inference does not block the event loop.
@app.post("/v2/models/{model_name}/infer")
def infer(model_name: str, req: InferRequest):
    try:
        return model_cfg.run(model_name, req.model_dump())
    except model_cfg.InferError as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
