"""An example service with a coordinator replica inside: it relays DERP and fans events out to every replica.

Run one copy per replica against one Postgres, each with its own data directory and address::

    export COORDINATOR_PG_CONNECTION_URL=postgresql://user:pass@db/coordinator
    COORDINATOR_DATA_DIR=./a COORDINATOR_DERP_SERVER_RELAY_URL=http://127.0.0.1:8001 \\
        uvicorn fanout:app --app-dir examples --port 8001 --http coordinator.edge:DerpHttpProtocol
    COORDINATOR_DATA_DIR=./b COORDINATOR_DERP_SERVER_RELAY_URL=http://127.0.0.1:8002 \\
        uvicorn fanout:app --app-dir examples --port 8002 --http coordinator.edge:DerpHttpProtocol

``POST /events`` with ``{"text": "..."}`` on any replica; ``GET /events`` on every replica lists it.
The replica's own endpoints (``/derp``, ``/healthz``, ``/readyz``, ``/api/v2/...``) are served too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from coordinator import Replica, load_settings

CHANNEL = "example_events"
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")  # coordinator.*

replica = Replica(load_settings())  # settings from COORDINATOR_* variables, as `coordinator server`
received: deque[dict] = deque(maxlen=100)


def on_event(payload: bytes) -> None:
    received.append(json.loads(payload))


async def post_event(request: Request) -> JSONResponse:
    body = await request.json()
    event = {"text": str(body.get("text", ""))[:1000], "from": request.url.netloc}
    await replica.pubsub.publish(CHANNEL, json.dumps(event))  # every replica's on_event gets it
    return JSONResponse(event, status_code=202)


async def list_events(request: Request) -> JSONResponse:
    return JSONResponse(list(received))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    async with replica.lifespan(app):
        unsubscribe = await replica.pubsub.subscribe(CHANNEL, on_event)  # LISTENed once Postgres answers
        try:
            yield
        finally:
            await unsubscribe()


app = Starlette(
    routes=[Route("/events", post_event, methods=["POST"]), Route("/events", list_events), *replica.routes()],
    lifespan=lifespan,
)
