"""Service A: the FastAPI gateway. One line of langfuse_mw, plus a traced httpx client."""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException
from langfuse import get_client

from langfuse_mw import LangfuseMiddleware, get_request_context
from langfuse_mw.httpx import AsyncTracedClient

app = FastAPI(title="gateway")
app.add_middleware(LangfuseMiddleware)
inventory = AsyncTracedClient(base_url=os.environ.get("INVENTORY_URL", "http://127.0.0.1:8001"))


@app.get("/checkout/{item_id}")
async def checkout(item_id: int) -> dict[str, object]:
    response = await inventory.get(f"/inventory/{item_id}")
    if response.status_code != 200:
        raise HTTPException(status_code=502, detail="inventory failed")
    stock = response.json()
    # A fake LLM call, recorded with the langfuse SDK as an app would: it nests under the
    # request's observation and carries its user and session.
    with get_client().start_as_current_observation(
        name="summarise-order", as_type="generation", model="demo-llm", input={"stock": stock}
    ) as generation:
        summary = f"{stock['available']} left at {stock['price']} EUR"
        generation.update(output=summary, usage_details={"input": 12, "output": 7})
    ctx = get_request_context()
    return {"item": item_id, "summary": summary, "request_id": ctx.request_id if ctx else None}
