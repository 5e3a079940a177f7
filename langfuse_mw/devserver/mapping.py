"""How Langfuse turns OTLP spans into observations and traces (the direct "v4" path).

Pure functions over the span dicts of ``langfuse_mw._otlp``; each rule cites the Langfuse
server function it mirrors (see shared/LANGFUSE_OTEL.md §2-4).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .._otlp import SpanDict, decode_json

__all__ = [
    "LEVELS",
    "aggregate_trace",
    "decode_json",
    "extract_environment",
    "extract_level",
    "extract_name",
    "extract_observation_type",
    "extract_session_id",
    "extract_tags",
    "extract_user_id",
    "iso_from_nanos",
    "langfuse_attributes",
    "normalize_environment",
    "observation_from_span",
]

Observation = dict[str, Any]

LEVELS = ("DEBUG", "DEFAULT", "WARNING", "ERROR")
DEFAULT_ENVIRONMENT = "default"

# OIP OBSERVATION_LEVEL_ALIASES; unknown values fall through to the status code.
_LEVEL_ALIASES = {
    "DEBUG": "DEBUG",
    "TRACE": "DEBUG",
    "VERBOSE": "DEBUG",
    "DEFAULT": "DEFAULT",
    "INFO": "DEFAULT",
    "LOG": "DEFAULT",
    "NOTICE": "DEFAULT",
    "OK": "DEFAULT",
    "SUCCESS": "DEFAULT",
    "WARNING": "WARNING",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "FATAL": "ERROR",
    "CRITICAL": "ERROR",
}

_OBSERVATION_TYPES = {
    "span": "SPAN",
    "generation": "GENERATION",
    "event": "EVENT",
    "embedding": "EMBEDDING",
    "agent": "AGENT",
    "tool": "TOOL",
    "chain": "CHAIN",
    "retriever": "RETRIEVER",
    "guardrail": "GUARDRAIL",
    "evaluator": "EVALUATOR",
}
_OPENINFERENCE_TYPES = {
    "CHAIN": "CHAIN",
    "RETRIEVER": "RETRIEVER",
    "LLM": "GENERATION",
    "EMBEDDING": "EMBEDDING",
    "AGENT": "AGENT",
    "TOOL": "TOOL",
    "GUARDRAIL": "GUARDRAIL",
    "EVALUATOR": "EVALUATOR",
}
_GEN_AI_OPERATION_TYPES = {
    "chat": "GENERATION",
    "completion": "GENERATION",
    "text_completion": "GENERATION",
    "generate_content": "GENERATION",
    "generate": "GENERATION",
    "embeddings": "EMBEDDING",
    "invoke_agent": "AGENT",
    "create_agent": "AGENT",
    "execute_tool": "TOOL",
}
_GENKIT_TYPES = {
    "background-model": "GENERATION",
    "model": "GENERATION",
    "embedder": "EMBEDDING",
    "tool": "TOOL",
    "tool.v2": "TOOL",
    "retriever": "RETRIEVER",
    "evaluator": "EVALUATOR",
}
_VERCEL_GENERATION = (
    "ai.generateText.doGenerate",
    "ai.streamText.doStream",
    "ai.generateObject.doGenerate",
    "ai.streamObject.doStream",
)
_VERCEL_EMBEDDING = ("ai.embedMany.doEmbed", "ai.embed.doEmbed")

_MODEL_KEYS = (
    "langfuse.observation.model.name",
    "gen_ai.response.model",
    "ai.model.id",
    "gen_ai.request.model",
    "llm.response.model",
    "llm.model_name",
    "model",
)
# The model keys ObservationTypeMapper's fallback looks at (a subset of the above).
_TYPE_MODEL_KEYS = (
    "langfuse.observation.model.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "llm.model_name",
    "model",
)

# extractInputAndOutput removes these from metadata.attributes whichever one was used.
_IO_KEYS = frozenset(
    {
        "langfuse.trace.input",
        "langfuse.trace.output",
        "langfuse.observation.input",
        "langfuse.observation.output",
        "ai.prompt.messages",
        "ai.prompt",
        "ai.toolCall.args",
        "ai.response.text",
        "ai.result.text",
        "ai.toolCall.result",
        "ai.response.object",
        "ai.result.object",
        "ai.response.toolCalls",
        "ai.result.toolCalls",
        "gcp.vertex.agent.llm_request",
        "gcp.vertex.agent.llm_response",
        "gcp.vertex.agent.tool_call_args",
        "gcp.vertex.agent.tool_response",
        "prompt",
        "all_messages_events",
        "events",
        "lk.input_text",
        "lk.user_transcript",
        "lk.chat_ctx",
        "lk.user_input",
        "lk.function_tool.output",
        "lk.response.text",
        "mlflow.spanInputs",
        "mlflow.spanOutputs",
        "traceloop.entity.input",
        "traceloop.entity.output",
        "input.value",
        "output.value",
        "final_result",
        "pydantic_ai.all_messages",
        "gen_ai.system_instructions",
        "input",
        "output",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
        "genkit:input",
        "genkit:output",
        "flue.turn.input",
        "flue.turn.output",
        "flue.tool.arguments",
        "flue.tool.result",
        "flue.task.prompt",
        "flue.task.result",
        "flue.operation.result",
        "flue.workflow.payload",
        "flue.workflow.result",
    }
)
_IO_PREFIXES = (
    "gen_ai.prompt",
    "gen_ai.completion",
    "llm.input_messages",
    "llm.output_messages",
    "langfuse.trace.metadata",
    "langfuse.observation.metadata",
    "ai.telemetry.metadata",
)
# Framework attribute pairs tried after the Langfuse ones, in OIP's order (truthy wins).
_IO_FALLBACKS = (
    ("mlflow.spanInputs", "mlflow.spanOutputs"),
    ("traceloop.entity.input", "traceloop.entity.output"),
    ("input.value", "output.value"),
    ("input", "output"),
    ("tool_arguments", "tool_response"),
    ("gen_ai.input.messages", "gen_ai.output.messages"),
    ("gen_ai.tool.call.arguments", "gen_ai.tool.call.result"),
)

_JS_EXACT_INT = 2**53  # integral doubles JavaScript writes digit for digit as Python would
_ENVIRONMENT_RE = re.compile(r"^[a-z0-9_-]+$")
_LANGFUSE_PREFIX_RE = re.compile(r"^(?:langfuse[-_]?)+")


# -- values -----------------------------------------------------------------------------------


def _js_stringify(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _js_value(value: Any) -> Any:
    """An attribute value as Langfuse's ``convertValueToPlainJavascript`` leaves it."""
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Infinity: Langfuse keeps OTLP/JSON's string spelling of them.
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        if value.is_integer() and abs(value) < _JS_EXACT_INT:
            # A JavaScript number has no int/float split: 2.0 is written "2", not "2.0".
            return int(value)
        return value
    if isinstance(value, list | tuple):
        return [_js_value(v) for v in value]
    if isinstance(value, bytes):
        return _js_stringify({"bytesValue": base64.b64encode(value).decode()})
    if isinstance(value, Mapping):
        # Langfuse JSON-stringifies a kvlist AnyValue as a whole instead of decoding it.
        values = [{"key": k, "value": _any_value_json(v)} for k, v in value.items()]
        return _js_stringify({"kvlistValue": {"values": values}})
    return "{}"  # an empty AnyValue


def _any_value_json(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    return {"stringValue": _js_stringify(_js_value(value))}


def langfuse_attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes converted the way Langfuse converts them before any rule reads them."""
    return {key: _js_value(value) for key, value in attrs.items()}


def _meaningful(value: Any) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, list | tuple | Mapping):
        return len(value) > 0
    return True


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else _js_stringify(value)


def _first_truthy(attrs: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if attrs.get(key):
            return attrs[key]
    return None


def iso_from_nanos(nanos: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, as Langfuse stores span times."""
    moment = datetime.fromtimestamp((nanos // 1_000_000) / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- single fields ----------------------------------------------------------------------------


def extract_name(span_name: str, attrs: Mapping[str, Any]) -> str:
    """OIP ``extractName``: tool and framework names beat the span name."""
    if attrs.get("gen_ai.tool.name"):
        return _as_text(attrs["gen_ai.tool.name"])
    if "genkit:name" in attrs:
        return str(attrs["genkit:name"])
    if attrs.get("logfire.msg"):
        return _as_text(attrs["logfire.msg"])
    if "ai.toolCall.name" in attrs:
        return str(attrs["ai.toolCall.name"])
    if "ai.operationId" in attrs:
        function_id = attrs.get("ai.telemetry.functionId")
        prefix = f"{function_id}:" if function_id else ""
        return f"{prefix}{attrs['ai.operationId']}"
    return span_name


def _vercel_operation(attrs: Mapping[str, Any], prefixes: Sequence[str]) -> bool:
    name, operation = attrs.get("operation.name"), attrs.get("ai.operationId")
    if _meaningful(name) and str(name).startswith(tuple(prefixes)):
        return True
    return _meaningful(operation) and str(operation) in prefixes


def extract_observation_type(
    attrs: Mapping[str, Any],
    resource: Mapping[str, Any],
    scope: Mapping[str, Any],
    span_name: str,
) -> str:
    """ObservationTypeMapper: the first mapper that answers wins; SPAN otherwise."""
    explicit = attrs.get("langfuse.observation.type")
    if (
        explicit == "span"
        and scope.get("name") == "langfuse-sdk"
        and resource.get("telemetry.sdk.language") == "python"
    ):
        # Python SDK <= 3.3 sent "span" for generations; newer versions are taken at their word.
        major, _, rest = str(scope.get("version") or "").partition(".")
        minor = rest.partition(".")[0]
        old = (
            not major.isdigit()
            or int(major) < 3
            or (int(major) == 3 and not (minor.isdigit() and int(minor) > 3))
        )
        generation_keys = {
            "langfuse.observation.model.name",
            "langfuse.observation.cost_details",
            "langfuse.observation.usage_details",
            "langfuse.observation.completion_start_time",
            "langfuse.observation.model.parameters",
            "langfuse.observation.prompt.name",
            "langfuse.observation.prompt.version",
        }
        if old and generation_keys.intersection(attrs):
            return "GENERATION"
    simple = (
        ("langfuse.observation.type", _OBSERVATION_TYPES),
        ("openinference.span.kind", _OPENINFERENCE_TYPES),
        ("gen_ai.operation.name", _GEN_AI_OPERATION_TYPES),
        ("genkit:metadata:subtype", _GENKIT_TYPES),
    )
    for key, table in simple:
        value = attrs.get(key)
        if _meaningful(value) and isinstance(value, str) and value in table:
            return table[value]
    has_model = any(
        _meaningful(attrs.get(k))
        for k in (
            "langfuse.observation.model.name",
            "ai.model.id",
            "gen_ai.request.model",
            "gen_ai.response.model",
        )
    )
    vercel_model_call = _vercel_operation(attrs, _VERCEL_GENERATION + _VERCEL_EMBEDDING)
    if has_model and vercel_model_call:
        return "GENERATION" if _vercel_operation(attrs, _VERCEL_GENERATION) else "EMBEDDING"
    operation = attrs.get("operation.name"), attrs.get("ai.operationId")
    is_ai_operation = any(_meaningful(v) and str(v).startswith("ai.") for v in operation)
    if is_ai_operation and not vercel_model_call and _vercel_operation(attrs, ["ai.toolCall"]):
        return "TOOL"
    if _meaningful(attrs.get("gen_ai.tool.name")) or _meaningful(attrs.get("gen_ai.tool.call.id")):
        return "TOOL"
    if _meaningful(attrs.get("flue.tool.name")) or _meaningful(attrs.get("flue.tool.call_id")):
        return "TOOL"
    if _meaningful(attrs.get("flue.task.id")) or _meaningful(attrs.get("flue.task.agent")):
        return "AGENT"
    if scope.get("name") == "livekit-agents":
        if span_name in ("agent_turn", "start_agent_activity"):
            return "AGENT"
        if span_name == "function_tool":
            return "TOOL"
    if any(_meaningful(attrs.get(k)) for k in _TYPE_MODEL_KEYS):
        return "GENERATION"
    return "SPAN"


def extract_level(attrs: Mapping[str, Any], status_code: int) -> str:
    """An explicit ``langfuse.observation.level`` (aliases allowed) beats an ERROR status."""
    explicit = attrs.get("langfuse.observation.level")
    if isinstance(explicit, str):
        level = _LEVEL_ALIASES.get(explicit.strip().upper())
        if level is not None:
            return level
    return "ERROR" if status_code == 2 else "DEFAULT"


def extract_user_id(attrs: Mapping[str, Any]) -> str | None:
    """OIP ``extractUserId``: the first truthy key; non-strings JSON-stringified."""
    value = _first_truthy(
        attrs,
        (
            "langfuse.user.id",
            "user.id",
            "langfuse.observation.metadata.langfuse_user_id",
            "langfuse.trace.metadata.langfuse_user_id",
            "ai.telemetry.metadata.userId",
        ),
    )
    return None if value is None else _as_text(value)


def extract_session_id(attrs: Mapping[str, Any]) -> str | None:
    """OIP ``extractSessionId``: the first truthy key; non-strings JSON-stringified."""
    value = _first_truthy(
        attrs,
        (
            "langfuse.session.id",
            "session.id",
            "gen_ai.conversation.id",
            "langfuse.observation.metadata.langfuse_session_id",
            "langfuse.trace.metadata.langfuse_session_id",
            "ai.telemetry.metadata.sessionId",
        ),
    )
    return None if value is None else _as_text(value)


def extract_tags(attrs: Mapping[str, Any]) -> list[str]:
    """OIP ``extractTags``: an array, a JSON array string, comma-separated, or one string."""
    value = _first_truthy(
        attrs,
        (
            "langfuse.trace.tags",
            "langfuse.tags",
            "langfuse.observation.metadata.langfuse_tags",
            "langfuse.trace.metadata.langfuse_tags",
            "ai.telemetry.metadata.tags",
            "tag.tags",
        ),
    )
    if isinstance(value, list):
        return [_js_string(tag) for tag in value]
    if not isinstance(value, str):
        return []
    if value.strip().startswith("["):
        parsed = decode_json(value)
        if isinstance(parsed, list):
            return [_js_string(tag) for tag in parsed]
    if "," in value:
        return [tag.strip() for tag in value.split(",")]
    return [value]


def _js_string(value: Any) -> str:
    """JavaScript's ``String(x)`` for JSON values."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join("" if v is None else _js_string(v) for v in value)
    if isinstance(value, Mapping):
        return "[object Object]"
    return str(value)


def normalize_environment(value: Any) -> str:
    """Lower-case, strip leading ``langfuse`` prefixes, keep 40 chars of ``[a-z0-9_-]``."""
    if not isinstance(value, str):
        return DEFAULT_ENVIRONMENT
    stripped = _LANGFUSE_PREFIX_RE.sub("", value.lower())[:40]
    return stripped if _ENVIRONMENT_RE.match(stripped) else DEFAULT_ENVIRONMENT


def extract_environment(attrs: Mapping[str, Any], resource: Mapping[str, Any]) -> str:
    """Each key on the span, then on the resource, before the next key; else ``default``."""
    for key in ("langfuse.environment", "deployment.environment.name", "deployment.environment"):
        if attrs.get(key):
            return normalize_environment(attrs[key])
        if resource.get(key):
            return normalize_environment(resource[key])
    return DEFAULT_ENVIRONMENT


def _parse_metadata_object(value: Any) -> dict[str, Any]:
    # A non-object top-level value is dropped (OIP parseMetadataAttribute).
    if isinstance(value, str):
        parsed = decode_json(value)
        if isinstance(parsed, dict):
            return parsed
        if isinstance(parsed, list):
            return {str(i): v for i, v in enumerate(parsed)}  # JS spreads arrays by index
        return {}
    return {}


def _extract_metadata(attrs: Mapping[str, Any], domain: str) -> dict[str, Any]:
    """OIP ``extractMetadata`` for ``langfuse.{observation,trace}.metadata``."""
    prefix = f"langfuse.{domain}.metadata"
    top = _parse_metadata_object(attrs.get(prefix) or attrs.get("langfuse.metadata"))
    excluded = {
        "ai.telemetry.metadata.userId",
        "ai.telemetry.metadata.sessionId",
        "ai.telemetry.metadata.tags",
        "ai.telemetry.metadata.langfusePrompt",
    }
    prefixed: dict[str, Any] = {}
    for key, value in attrs.items():
        for candidate in (prefix, "langfuse.metadata", "ai.telemetry.metadata"):
            if key.startswith(candidate + ".") and key not in excluded:
                name = key[len(candidate) + 1 :]
                if name:
                    prefixed[name] = value
    return {**top, **prefixed}


def _input_output(attrs: Mapping[str, Any]) -> tuple[Any, Any]:
    """OIP ``extractInputAndOutput`` (the Langfuse keys and the common framework keys)."""
    value_in = attrs.get("langfuse.observation.input")
    value_out = attrs.get("langfuse.observation.output")
    if value_in is not None or value_out is not None:
        return value_in, value_out
    value_in = attrs.get("gcp.vertex.agent.llm_request")
    value_out = attrs.get("gcp.vertex.agent.llm_response")
    if value_in == "{}" or not value_in:
        value_in = attrs.get("gcp.vertex.agent.tool_call_args")
    if value_out == "{}" or not value_out:
        value_out = attrs.get("gcp.vertex.agent.tool_response")
    if value_in or value_out:
        return value_in, value_out
    for in_key, out_key in (("prompt", "all_messages_events"),):
        if attrs.get(in_key) or attrs.get(out_key):
            return attrs.get(in_key), attrs.get(out_key)
    value_in = attrs.get("lk.input_text") or attrs.get("lk.user_transcript")
    value_in = value_in if value_in is not None else attrs.get("lk.chat_ctx")
    value_out = attrs.get("lk.function_tool.output") or attrs.get("lk.response.text")
    if value_in or value_out:
        return value_in, value_out
    for in_key, out_key in _IO_FALLBACKS:
        if attrs.get(in_key) or attrs.get(out_key):
            return attrs.get(in_key), attrs.get(out_key)
    return None, None


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _json_object(attrs: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    parsed = decode_json(attrs.get(key)) if attrs.get(key) else None
    return parsed if isinstance(parsed, dict) else None


def _usage(attrs: Mapping[str, Any]) -> dict[str, Any]:
    explicit = _json_object(attrs, "langfuse.observation.usage_details")
    if explicit is not None:
        return explicit
    usage: dict[str, Any] = {}
    for target, keys in (
        ("input", ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")),
        ("output", ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")),
        ("total", ("gen_ai.usage.total_tokens",)),
    ):
        value = _first_truthy(attrs, keys)
        if isinstance(value, int | float) and not isinstance(value, bool):
            usage[target] = value
    return usage


# -- observations -----------------------------------------------------------------------------


def observation_from_span(span: SpanDict) -> Observation:
    """One span as the observation Langfuse stores, plus the trace fields it carries.

    Trace-level fields (``traceName``, ``userId``, ``sessionId``, ``tags``, ``public``,
    ``release``, ``isAppRoot``) are per span, as in Langfuse's events table; use
    :func:`aggregate_trace` to combine them.
    """
    attrs = langfuse_attributes(span.get("attributes") or {})
    resource = langfuse_attributes(span.get("resource") or {})
    raw_scope = span.get("scope") or {}
    scope = {
        "name": raw_scope.get("name", ""),
        "version": raw_scope.get("version", ""),
        "attributes": langfuse_attributes(raw_scope.get("attributes") or {}),
    }
    status = span.get("status") or {}
    start_ns = int(span.get("start_time_unix_nano") or 0)
    end_ns = int(span.get("end_time_unix_nano") or 0)
    # A missing edge copies the other one (OIP resolveSpanTimestamps).
    start_ns, end_ns = start_ns or end_ns, end_ns or start_ns
    if not start_ns:
        start_ns = end_ns = int(datetime.now(UTC).timestamp() * 1e9)

    value_in, value_out = _input_output(attrs)
    filtered = {
        key: value if isinstance(value, str) else _js_stringify(value)
        for key, value in attrs.items()
        if key not in _IO_KEYS and not key.startswith(_IO_PREFIXES)
    }
    is_sdk = str(scope["name"]).startswith("langfuse-sdk")
    metadata: dict[str, Any] = {
        **({} if is_sdk else {"attributes": filtered}),
        "resourceAttributes": resource,
        "scope": scope,
        **_extract_metadata(attrs, "observation"),
        **_extract_metadata(attrs, "trace"),
    }
    observation_type = extract_observation_type(attrs, resource, scope, span.get("name", ""))
    model = _first_truthy(attrs, _MODEL_KEYS)
    completion_start = decode_json(attrs.get("langfuse.observation.completion_start_time"))
    status_message = attrs.get("langfuse.observation.status_message")
    if status_message is None:
        status_message = status.get("message") or None
    public = attrs.get("langfuse.trace.public")
    if public is None:
        public = attrs.get("langfuse.public")
    # `??`, not `||`, in OIP: an empty span value still wins over the resource's.
    release = _coalesce(attrs.get("langfuse.release"), resource.get("langfuse.release"))
    version = _coalesce(attrs.get("langfuse.version"), resource.get("service.version"))
    trace_name = attrs.get("langfuse.trace.name")
    is_generation = observation_type == "GENERATION"
    return {
        "id": span["span_id"],
        "traceId": span["trace_id"],
        "parentObservationId": span.get("parent_span_id") or None,
        "name": extract_name(span.get("name", ""), attrs),
        "type": observation_type,
        "level": extract_level(attrs, int(status.get("code") or 0)),
        "statusMessage": status_message,
        "startTime": iso_from_nanos(start_ns),
        "endTime": iso_from_nanos(end_ns),
        "completionStartTime": completion_start if isinstance(completion_start, str) else None,
        "latency": round((end_ns - start_ns) / 1e9, 3),
        "input": decode_json(value_in),
        "output": decode_json(value_out),
        # Top-level metadata values are stored as strings and JSON-decoded on read.
        "metadata": {key: decode_json(value) for key, value in metadata.items()},
        "model": None if model is None else _as_text(model),
        "modelParameters": _json_object(attrs, "langfuse.observation.model.parameters") or {},
        "usageDetails": _usage(attrs),
        "costDetails": _json_object(attrs, "langfuse.observation.cost_details") or {},
        "promptName": attrs.get("langfuse.observation.prompt.name") if is_generation else None,
        "promptVersion": (
            decode_json(attrs.get("langfuse.observation.prompt.version")) if is_generation else None
        ),
        "version": None if version is None else _as_text(version),
        "environment": extract_environment(attrs, resource),
        "serviceName": resource.get("service.name"),
        # Trace fields, carried per span.
        "traceName": None if trace_name is None else _as_text(trace_name),
        "userId": extract_user_id(attrs),
        "sessionId": extract_session_id(attrs),
        "tags": extract_tags(attrs),
        "public": None if public is None else public is True or public == "true",
        "release": None if release is None else _as_text(release),
        "isAppRoot": attrs.get("langfuse.internal.is_app_root") in (True, "true"),
        "startTimeUnixNano": start_ns,
        "endTimeUnixNano": end_ns,
    }


# -- traces -----------------------------------------------------------------------------------


def _is_root(observation: Observation) -> bool:
    return not observation.get("parentObservationId") or bool(observation.get("isAppRoot"))


def _latest(ordered: Sequence[Observation], key: str) -> Any:
    for observation in reversed(ordered):
        value = observation.get(key)
        if value not in (None, "", []):
            return value
    return None


def aggregate_trace(trace_id: str, observations: Sequence[Observation]) -> dict[str, Any]:
    """A trace as Langfuse's events-table aggregation shows it.

    ``observations`` must be in ingestion order (oldest first): "latest" means last ingested,
    as Langfuse's ``argMaxIf(..., event_ts, ...)``.
    """
    ordered = list(observations)
    parentless = [o for o in ordered if not o.get("parentObservationId")]
    # Input, output and metadata come from a parentless observation only; an app root with a
    # remote parent does not provide them (EVENTS_AGGREGATION_FIELDS).
    top = parentless[-1] if parentless else None
    name = _latest(ordered, "traceName")
    if name is None:
        name = _latest([o for o in ordered if _is_root(o)], "name")
    starts = [int(o.get("startTimeUnixNano") or 0) for o in ordered]
    ends = [int(o.get("endTimeUnixNano") or 0) for o in ordered]
    first = min(starts) if starts else 0
    last = max(starts + ends) if starts else 0
    levels = {o.get("level") for o in ordered}
    level = next((lv for lv in ("ERROR", "WARNING", "DEFAULT") if lv in levels), "DEBUG")
    public_values = [o["public"] for o in ordered if o.get("public") is not None]
    return {
        "id": trace_id,
        "name": name,
        "timestamp": iso_from_nanos(first) if ordered else None,
        "userId": _latest(ordered, "userId"),
        "sessionId": _latest(ordered, "sessionId"),
        "tags": _latest(ordered, "tags") or [],
        "environment": _latest(ordered, "environment") or DEFAULT_ENVIRONMENT,
        "release": _latest(ordered, "release"),
        "version": _latest(ordered, "version"),
        "public": any(public_values),
        "input": top.get("input") if top else None,
        "output": top.get("output") if top else None,
        "metadata": top.get("metadata") if top else None,
        "latency": round((last - first) / 1e9, 3),
        "level": level,
        "errorCount": sum(1 for o in ordered if o.get("level") == "ERROR"),
        "warningCount": sum(1 for o in ordered if o.get("level") == "WARNING"),
        "observationCount": len(ordered),
        "startTimeUnixNano": first,
    }
