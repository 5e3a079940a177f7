"""Service B: the Flask inventory service, calling the pricing service with requests."""

from __future__ import annotations

import os

from flask import Flask, abort, jsonify
from flask.typing import ResponseReturnValue

from langfuse_mw.flask import LangfuseFlask
from langfuse_mw.requests import TracedSession

app = Flask("inventory")
LangfuseFlask(app)
PRICING_URL = os.environ.get("PRICING_URL", "http://127.0.0.1:8002")
pricing = TracedSession()


@app.get("/inventory/<int:item_id>")
def stock(item_id: int) -> ResponseReturnValue:
    response = pricing.get(f"{PRICING_URL}/price/{item_id}", timeout=10)
    if response.status_code != 200:
        abort(502)
    return jsonify(item=item_id, available=7 * item_id, price=response.json()["price"])
