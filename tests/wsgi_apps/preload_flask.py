"""The shared Flask app for ``gunicorn --preload``, traced in the parent before it forks.

At import (in the gunicorn master, with ``--preload``) it serves one request through the
traced app, so the master holds a runtime, an export thread and two queued spans (the request
and its generation, request id ``pre-fork``) when the workers are forked. ``/whoami/<n>``
records a generation with the worker's pid in its metadata.
"""

from __future__ import annotations

import os
from typing import Any

from langfuse import get_client

from langfuse_mw.flask import LangfuseFlask
from tests.wsgi_apps.flask_app import build

app = build()


@app.get("/whoami/<int:n>")
def whoami(n: int) -> Any:
    with get_client().start_as_current_observation(
        name="work", as_type="generation", input=f"request {n}"
    ) as generation:
        generation.update(metadata={"pid": os.getpid()})
    return {"pid": os.getpid(), "n": n}


LangfuseFlask(app)

PARENT_PID = os.getpid()
with app.test_client() as _client:
    assert _client.get("/items/0", headers={"x-request-id": "pre-fork"}).status_code == 200
