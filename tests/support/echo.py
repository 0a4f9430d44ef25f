"""An upstream that reads request bodies exactly as the real services do and answers with the
number of items it found, so a test can put what the gateway charged next to what an
upstream would have served.

It is a FastAPI app (the services' framework and version, so the same body parsing:
Content-Type rules, `json.loads` with its encoding detection) whose routes take the
services' own request models (`narthex.inference.schemas`, `narthex.features.schemas`)
and, for the Open Inference Protocol, inference's own codec: the content decoder
(`narthex.common.codings`) and `narthex.inference.oip.decode_request`. Each limited route
answers `{"items": n, "model": ...}`; `GET /v1/models` lists three models. No
authentication: it sits behind the gateway under test, on loopback.

    python -m tests.support.echo --port 8123
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from narthex.common.codings import decode_content
from narthex.features.schemas import IngestRequest
from narthex.inference import oip
from narthex.inference.schemas import EmbeddingsRequest, PredictRequest

MODELS = ("fraud", "minilm", "other")

app = FastAPI(title="echo upstream")


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model"} for name in MODELS]}


@app.get("/v1/models/{name}")
async def model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model"}


@app.get("/v2/models/{name}")
async def model_metadata(name: str) -> dict[str, Any]:
    return {"name": name}


@app.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest) -> dict[str, Any]:
    items = 1 if isinstance(body.input, str) else len(body.input)
    return {"items": items, "model": body.model}


@app.post("/v1/models/{name}/predict")
@app.post("/v1/models/{name}/versions/{version}/predict")
async def predict(name: str, body: PredictRequest) -> dict[str, Any]:
    return {"items": len(body.instances), "model": name}


@app.post("/v1/events/transactions")
async def events(body: IngestRequest) -> dict[str, Any]:
    return {"items": len(body.events)}


@app.post("/v2/models/{name}/infer")
@app.post("/v2/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request) -> JSONResponse:
    try:
        body = decode_content(
            await request.body(), request.headers.getlist("content-encoding"), limit=16 << 20
        )
        decoded = oip.decode_request(
            body, oip.parse_header_length(request.headers.get(oip.HEADER_LENGTH))
        )
    except oip.OipError as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    # The batch the model would compute: inputs' first dimension (inference requires them
    # to agree; the largest is what a model taking them would serve).
    items = max((t.shape[0] for t in decoded.inputs if t.shape), default=0)
    return JSONResponse({"items": items, "model": name})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http="httptools")


if __name__ == "__main__":
    main()
