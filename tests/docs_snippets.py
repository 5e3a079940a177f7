"""Find every fenced code block of the docs and run it (used by tests/test_docs.py).

Python blocks are executed for real, in a fresh module, with the environment pointed at a
local receiver (``langfuse_mw.devserver.DevServer``). When a block leaves an app in its
namespace (``application``, ``app``, or what ``create_app()`` returns), one request is sent
through it: ASGI apps with httpx's ASGI transport (between lifespan startup and shutdown),
WSGI apps (Flask too) with werkzeug's test client. The response must not be a 5xx and the
request's observation must reach the receiver. ``isolated()`` leaves the process as it was
(runtime shut down, environment, logger level, SIGTERM handler). Shell blocks are checked
against the real command line parsers (``langfuse-mw``, uvicorn, gunicorn, pip extras, make
targets); JSON, TOML and YAML blocks are parsed. ``text`` and ``mermaid`` blocks are
diagrams, not code; a fence without a language is an error.

A block may be preceded by a marker, an HTML comment mkdocs leaves out of the page::

    <!-- docs-test: FLAG FLAG option="value" -->

Flags:

- ``skip reason="..."``: not executed (a Python block is still compiled); keep these rare.
- ``continue``: run in the namespace of the page's previous Python block (executed first);
  ``continue=NAME`` continues the block marked ``name=NAME`` on the same page instead.
- ``in-request``: run as the body of a handler, inside a traced (WSGI) request.
- ``with-runtime``: ``langfuse_mw.init()`` first, as a running service would have.
- ``same-keys``: for ``>>>`` sessions whose output is a dict: compare its keys only (the
  values are those of one moment in a real service). Other sessions compare ``repr``.
- ``django-settings``: a settings excerpt. In a subprocess, ``...`` in ``INSTALLED_APPS`` and
  ``MIDDLEWARE`` stands for Django's ``startproject`` defaults not listed (admin and
  staticfiles aside), placed in Django's order; Django is configured with it, the system
  checks must pass, and a GET through every middleware must be traced.
- ``pytest app=flask|fastapi|django``: a test module, run by pytest in a subprocess next to
  a small ``myapp`` package (a ``/checkout`` route) and a ``client`` fixture.
- ``serve args="..."``: a console block whose command is started (with ``args`` appended),
  whose printed lines must be those shown, and which must stop with status 0 on SIGTERM.

Options for blocks that define an app: ``request="POST /chat"`` (default ``GET /``; POST,
PUT and PATCH send ``{}`` as JSON), ``status=200`` (default: anything but a 5xx),
``expect="POST /chat; llm"`` (names of observations the receiver must get; by default one
named after the request's method).

Every executed snippet has ``http://127.0.0.1:3000`` (the receiver's documented address)
replaced with the test receiver's URL, whose keys are the documented ``pk-lf-dev`` /
``sk-lf-dev``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

DEV_URL = "http://127.0.0.1:3000"
DEV_PUBLIC_KEY, DEV_SECRET_KEY = "pk-lf-dev", "sk-lf-dev"

PYTHON = frozenset({"python", "py", "pycon"})
SHELL = frozenset({"bash", "sh", "shell", "console"})
DATA = frozenset({"json", "toml", "yaml", "yml"})
TEXT = frozenset({"text", "mermaid"})

FLAGS = frozenset(
    {"skip", "continue", "in-request", "with-runtime", "same-keys", "django-settings",
     "pytest", "serve"}
)  # fmt: skip
OPTIONS = frozenset(
    {"reason", "name", "continue", "request", "status", "expect", "app", "args"}
)  # fmt: skip

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
_SUBPROCESS_TIMEOUT = 60


# -- finding the blocks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    flags: frozenset[str] = frozenset()
    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: str, where: str) -> Marker:
        flags: set[str] = set()
        options: dict[str, str] = {}
        for token in shlex.split(body):
            key, eq, value = token.partition("=")
            if eq:
                if key not in OPTIONS:
                    raise ValueError(f"{where}: unknown docs-test option {key!r}")
                options[key] = value
            elif token in FLAGS:
                flags.add(token)
            else:
                raise ValueError(f"{where}: unknown docs-test flag {token!r}")
        if "continue" in options:
            flags.add("continue")
        return cls(frozenset(flags), options)


@dataclass(frozen=True)
class Block:
    page: Path
    index: int  # among the page's fenced blocks
    line: int  # of the first line of code, 1-based
    lang: str
    code: str
    marker: Marker
    previous: Block | None = None  # what a "continue" block runs after

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}:{self.lang or 'plain'}"

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"

    @property
    def kind(self) -> str:
        for kind, langs in (("python", PYTHON), ("shell", SHELL), ("data", DATA), ("text", TEXT)):
            if self.lang in langs:
                return kind
        return "unknown"

    @property
    def category(self) -> str:
        """executed, validated (parsed or checked against a parser), skipped, or text."""
        if self.kind == "text":
            return "text"
        if "skip" in self.marker.flags:
            return "skipped"
        if self.kind == "python" or "serve" in self.marker.flags:
            return "executed"
        return "validated"

    def flag(self, name: str) -> bool:
        return name in self.marker.flags

    def chain(self) -> list[Block]:
        blocks: list[Block] = [self]
        while blocks[0].previous is not None:
            blocks.insert(0, blocks[0].previous)
        return blocks


def _shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def collect(pages: list[Path] = PAGES) -> list[Block]:
    """Every fenced block of ``pages``; raises ValueError on a malformed fence or marker."""
    blocks: list[Block] = []
    for page in pages:
        blocks.extend(_page_blocks(page))
    return blocks


def _page_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    named: dict[str, Block] = {}
    last_python: Block | None = None
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        where = f"{_shown(page)}:{i + 2}"
        if end == len(lines):
            raise ValueError(f"{where}: unclosed code fence")
        marker = Marker()
        before = i - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0 and (found := _MARKER.match(lines[before])):
            marker = Marker.parse(found["body"], where)
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        previous = None
        if "continue" in marker.flags:
            target = marker.options.get("continue")
            previous = named.get(target) if target else last_python
            if previous is None:
                raise ValueError(f"{where}: 'continue' without a block to continue")
        block = Block(page, len(blocks), i + 2, opening["lang"], code, marker, previous)
        blocks.append(block)
        if block.kind == "python":
            last_python = block
        if "name" in marker.options:
            named[marker.options["name"]] = block
        i = end + 1
    return blocks


def problems(block: Block) -> list[str]:
    """What is wrong with a block's language or marker (an empty list when nothing)."""
    found: list[str] = []
    if block.kind == "unknown":
        found.append(f"unknown or missing language {block.lang!r}: use one of "
                     f"{sorted(PYTHON | SHELL | DATA | TEXT)}")  # fmt: skip
    if block.flag("skip") and not block.marker.options.get("reason", "").strip():
        found.append("a skip needs a reason")
    if block.flag("pytest") and block.marker.options.get("app") not in _APPS:
        found.append(f"pytest needs app= one of {sorted(_APPS)}")
    python_only = {"continue", "in-request", "with-runtime", "same-keys", "django-settings",
                   "pytest"}  # fmt: skip
    if block.kind != "python" and block.marker.flags & python_only:
        found.append(f"{sorted(block.marker.flags & python_only)} apply to Python blocks only")
    if block.flag("serve") and block.lang != "console":
        found.append("serve applies to console blocks only")
    if block.previous is not None and block.previous.category != "executed":
        found.append("continues a block that is not executed Python")
    return [f"{block.where}: {problem}" for problem in found]


# -- running a block ------------------------------------------------------------------------


def check(block: Block, receiver: Any, tmp_path: Path) -> None:
    """Run or validate ``block`` (not a skipped one); AssertionError says what is wrong."""
    if block.kind == "python":
        if block.flag("django-settings"):
            run_django_settings(block, receiver, tmp_path)
        elif block.flag("pytest"):
            run_pytest(block, tmp_path)
        else:
            run_python(block, receiver)
    elif block.kind == "shell":
        if block.flag("serve"):
            run_serve(block, tmp_path)
        else:
            validate_shell(block)
    elif block.kind == "data":
        validate_data(block)


def source(block: Block, code: str | None = None, receiver: Any = None) -> str:
    """The block's code, preceded by blank lines so tracebacks name the line of the page."""
    text = block.code if code is None else code
    if receiver is not None:
        text = text.replace(DEV_URL, receiver.url)
    return "\n" * (block.line - 1) + text


def compile_block(block: Block) -> None:
    """Syntax check only (skipped blocks)."""
    code = block.code
    if code.lstrip().startswith(">>>"):
        code = "".join(e.source for e in doctest.DocTestParser().get_examples(code))
    compile(source(block, code), str(block.page), "exec", dont_inherit=True)


def run_python(block: Block, receiver: Any) -> None:
    """Execute the block (after the blocks it continues) in a fresh module, then its app."""
    from langfuse_mw import runtime

    module = types.ModuleType(f"docs_snippet_{block.page.stem}_{block.line}".replace("-", "_"))
    module.__file__ = str(block.page)
    sys.modules[module.__name__] = module
    try:
        for step in block.chain():
            if step.flag("with-runtime"):
                runtime.init()
            if step.code.lstrip().startswith(">>>"):
                run_session(step, module.__dict__, receiver)
                continue
            code = compile(source(step, receiver=receiver), str(step.page), "exec",
                           dont_inherit=True)  # fmt: skip
            if step.flag("in-request"):
                in_request(lambda code=code: exec(code, module.__dict__))
            else:
                exec(code, module.__dict__)
        app = find_app(module.__dict__)
        if app is not None:
            exercise(app, block, receiver)
    finally:
        sys.modules.pop(module.__name__, None)


def run_session(block: Block, namespace: dict[str, Any], receiver: Any) -> None:
    """A ``>>>`` session: each example runs; its output is compared (``same-keys``: dict keys)."""
    for example in doctest.DocTestParser().get_examples(block.code):
        padded = "\n" * (block.line - 1 + example.lineno) + example.source
        padded = padded.replace(DEV_URL, receiver.url)
        where = f"{_shown(block.page)}:{block.line + example.lineno}"
        if not example.want.strip():
            exec(compile(padded, str(block.page), "exec", dont_inherit=True), namespace)
            continue
        got = eval(compile(padded, str(block.page), "eval", dont_inherit=True), namespace)
        if block.flag("same-keys"):
            shown = ast.literal_eval(example.want.strip())
            assert isinstance(got, dict), f"{where}: {got!r} is not a dict"
            assert sorted(got) == sorted(shown), (
                f"{where}: keys differ: missing from the docs {sorted(set(got) - set(shown))}, "
                f"not returned any more {sorted(set(shown) - set(got))}"
            )
        else:
            assert " ".join(repr(got).split()) == " ".join(example.want.split()), (
                f"{where}: got {got!r}, the docs show {example.want.strip()}"
            )


def in_request(body: Any) -> None:
    """Call ``body()`` inside a request traced by LangfuseWSGIMiddleware."""
    from werkzeug.test import Client

    from langfuse_mw.wsgi import LangfuseWSGIMiddleware

    def handler(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    response = Client(LangfuseWSGIMiddleware(handler)).get("/docs-snippet")
    response.close()
    assert response.status_code == 200


def find_app(namespace: Mapping[str, Any]) -> Any:
    for name in ("application", "app"):
        if callable(namespace.get(name)):
            return namespace[name]
    factory = namespace.get("create_app")
    return factory() if callable(factory) else None


def is_asgi(app: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(type(app).__call__)


def exercise(app: Any, block: Block, receiver: Any) -> None:
    """One request through ``app``; then the receiver must have its observation."""
    import langfuse_mw

    method, _, path = block.marker.options.get("request", "GET /").partition(" ")
    body = {} if method in {"POST", "PUT", "PATCH"} else None
    if is_asgi(app):
        status = asyncio.run(asyncio.wait_for(_asgi_request(app, method, path, body), 30))
    else:
        from werkzeug.test import Client

        response = Client(app).open(path, method=method, json=body)
        response.get_data()
        response.close()
        status = response.status_code
    where = f"{block.where}: {method} {path}"
    if "status" in block.marker.options:
        assert status == int(block.marker.options["status"]), f"{where} answered {status}"
    else:
        assert status < 500, f"{where} answered {status}"
    langfuse_mw.shutdown(5.0)  # exports what is queued
    names = [span["name"] for span in receiver.received_spans()]
    expected = block.marker.options.get("expect")
    if expected:
        missing = [n.strip() for n in expected.split(";") if n.strip() not in names]
        assert not missing, f"{where}: the receiver got {names}, not {missing}"
    else:
        assert any(n.startswith(f"{method} ") for n in names), (
            f"{where}: no observation of the request reached the receiver (got {names})"
        )


async def _asgi_request(app: Any, method: str, path: str, body: Any) -> int:
    """Lifespan startup, the request (httpx's ASGI transport), lifespan shutdown."""
    import httpx

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: list[str] = []
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        replies.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.ensure_future(app(scope, inbox.get, send))
    inbox.put_nowait({"type": "lifespan.startup"})
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({lifespan, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiter.cancel()
        lifespan.result()  # the app's exception (an unknown option, a bad value...)
        raise AssertionError(f"the app ended its lifespan without starting up: {replies}")
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        status = (await client.request(method, path, json=body)).status_code
    inbox.put_nowait({"type": "lifespan.shutdown"})
    await lifespan
    assert "lifespan.shutdown.complete" in replies, replies
    return status


# -- Django settings (a subprocess: Django is configured once per process) -------------------

DJANGO_DEFAULT_APPS = (
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
)
DJANGO_DEFAULT_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
)


def fill_ellipsis(listed: list[Any], defaults: tuple[str, ...]) -> list[str]:
    """``[..., "b", ...]`` → the entries listed, plus the defaults not listed in their order."""
    if Ellipsis not in listed:
        return list(listed)
    result = [entry for entry in listed if entry is not Ellipsis]
    for n, entry in enumerate(defaults):
        if entry in result:
            continue
        anchors = [later for later in defaults[n + 1 :] if later in result]
        result.insert(result.index(anchors[0]) if anchors else len(result), entry)
    return result


def run_django_settings(block: Block, receiver: Any, tmp_path: Path) -> None:
    path = tmp_path / "settings_excerpt.py"
    path.write_text(source(block, receiver=receiver))
    result = subprocess.run(
        [sys.executable, "-m", "tests.docs_snippets", "django-settings", str(path),
         str(block.page), block.where],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
        timeout=_SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, f"{block.where}:\n{result.stdout}\n{result.stderr}"
    names = [span["name"] for span in receiver.received_spans()]
    assert "GET hello/" in names, f"{block.where}: the receiver got {names}"


def _django_settings_main(path: str, filename: str, where: str) -> int:
    """In the subprocess: configure Django with the excerpt, check it, send one request."""
    import django
    from django.conf import settings
    from django.core import checks
    from django.http import HttpResponse
    from django.test import Client
    from django.urls import path as route

    import langfuse_mw

    namespace: dict[str, Any] = {}
    exec(compile(Path(path).read_text(), filename, "exec", dont_inherit=True), namespace)
    excerpt = {k: v for k, v in namespace.items() if k.isupper()}
    excerpt["INSTALLED_APPS"] = fill_ellipsis(excerpt.get("INSTALLED_APPS", []),
                                              DJANGO_DEFAULT_APPS)  # fmt: skip
    excerpt["MIDDLEWARE"] = fill_ellipsis(excerpt.get("MIDDLEWARE", []), DJANGO_DEFAULT_MIDDLEWARE)
    urls = types.ModuleType("docs_snippet_urls")
    urls.urlpatterns = [route("hello/", lambda request: HttpResponse("hello"))]
    sys.modules[urls.__name__] = urls
    base = {"SECRET_KEY": "docs-test", "ALLOWED_HOSTS": ["testserver"], "USE_TZ": True,
            "DATABASES": {}, "ROOT_URLCONF": urls.__name__}  # fmt: skip
    settings.configure(**{**base, **excerpt})
    django.setup()
    messages = checks.run_checks()
    for message in messages:
        print(message, file=sys.stderr)
    bad = [m for m in messages if m.is_serious() or m.id.startswith("langfuse_mw.")]
    if bad:
        print(f"{where}: system checks failed", file=sys.stderr)
        return 1
    # Sampled by its caller, so that the excerpt's sample_rate cannot drop it.
    traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
    response = Client().get("/hello/", headers={"traceparent": traceparent})
    if response.status_code != 200:
        print(f"{where}: GET /hello/ answered {response.status_code}", file=sys.stderr)
        return 1
    langfuse_mw.shutdown(5.0)
    return 0


# -- pytest modules (a subprocess next to a small app) --------------------------------------

_FLASK_APP = """\
from flask import Flask

from langfuse_mw.flask import LangfuseFlask

app = Flask(__name__)
LangfuseFlask(app)


@app.get("/checkout")
def checkout():
    return "ok"
"""

_FASTAPI_APP = """\
from fastapi import FastAPI
from langfuse import get_client

from langfuse_mw import LangfuseMiddleware

app = FastAPI()
app.add_middleware(LangfuseMiddleware)


@app.post("/checkout")
async def checkout() -> dict:
    with get_client().start_as_current_observation(name="llm", as_type="generation") as gen:
        gen.update(output="ok")
    return {"ok": True}
"""

_DJANGO_URLS = """\
from django.http import HttpResponse
from django.urls import path

urlpatterns = [path("checkout/", lambda request: HttpResponse("ok"))]
"""

_DJANGO_CONFTEST = """\
import django
from django.conf import settings

settings.configure(
    SECRET_KEY="docs-test", ALLOWED_HOSTS=["testserver"], USE_TZ=True, DATABASES={},
    ROOT_URLCONF="myapp.urls", INSTALLED_APPS=["langfuse_mw.django"],
    MIDDLEWARE=["langfuse_mw.django.LangfuseMiddleware"],
)
django.setup()
"""

_CLIENT_FIXTURE = """\
import pytest

from myapp import app


@pytest.fixture
def client():
    return app.test_client()
"""

_APPS: dict[str, dict[str, str]] = {
    "flask": {"myapp/__init__.py": _FLASK_APP, "conftest.py": _CLIENT_FIXTURE},
    "fastapi": {"myapp/__init__.py": _FASTAPI_APP, "conftest.py": ""},
    "django": {
        "myapp/__init__.py": "",
        "myapp/urls.py": _DJANGO_URLS,
        "myapp/tracing.py": 'def user_id(info):\n    return "u-1"\n',
        "conftest.py": _DJANGO_CONFTEST,
    },
}


def run_pytest(block: Block, tmp_path: Path) -> None:
    for name, text in _APPS[block.marker.options["app"]].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "test_snippet.py").write_text(source(block))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, f"{block.where}:\n{result.stdout}\n{result.stderr}"


# -- console and shell blocks ---------------------------------------------------------------


def commands(block: Block) -> list[tuple[str, list[str], list[str]]]:
    """(line, argv, output lines shown after it) for each command of a shell block."""
    found: list[tuple[str, list[str], list[str]]] = []
    joined = block.code.replace("\\\n", " ")
    for line in joined.splitlines():
        if block.lang == "console" and not line.startswith("$ "):
            if found:
                found[-1][2].append(line)
            continue
        text = line.removeprefix("$ ").strip()
        if text and not text.startswith("#"):
            found.append((text, shlex.split(text, comments=True), []))
    return found


def run_serve(block: Block, tmp_path: Path) -> None:
    """Start the block's one command; it must print what the docs show, serve at the URL it
    printed, and stop with status 0 on SIGTERM."""
    import httpx

    [(line, argv, shown)] = commands(block)
    executable = Path(sys.executable).with_name(argv[0])
    assert executable.exists(), f"{block.where}: no command {argv[0]!r} installed"
    extra = shlex.split(block.marker.options.get("args", ""))
    with subprocess.Popen(
        [str(executable), *argv[1:], *extra], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        timer = threading.Timer(_SUBPROCESS_TIMEOUT / 2, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            printed = [proc.stdout.readline().rstrip("\n") for _ in shown]
            urls = re.findall(r"http://127\.0\.0\.1:\d+", printed[0])
            assert urls, f"{block.where}: `{line}` printed {printed}"
            # As someone reading those lines would: the server answers at the printed URL.
            # (The command installs its SIGTERM handler only after printing: a SIGTERM sent
            # the instant the last line appears may still find the default action.)
            assert httpx.get(f"{urls[0]}/api/public/health", timeout=10).status_code == 200
            proc.send_signal(signal.SIGTERM)
            proc.wait(_SUBPROCESS_TIMEOUT / 2)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
    printed = [text.replace(urls[0], DEV_URL) for text in printed]
    assert printed == [text.rstrip() for text in shown], f"{block.where}: `{line}` printed"
    assert proc.returncode == 0, f"{block.where}: exit {proc.returncode} on SIGTERM"


def validate_shell(block: Block) -> None:
    for line, argv, _ in commands(block):
        where = f"{block.where}: `{line}`"
        validator = _SHELL.get(argv[0])
        assert validator is not None, f"{where}: no check for {argv[0]!r}: add a docs-test marker"
        validator(where, line, argv)


def _pip(where: str, line: str, argv: list[str]) -> None:
    assert argv[1:2] == ["install"], where
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    named = {name for group in re.findall(r"\[([\w,-]+)\]", line) for name in group.split(",")}
    assert named <= extras, f"{where}: unknown extras {sorted(named - extras)}"
    packages = [arg for arg in argv[2:] if not arg.startswith("-")]
    assert all(re.split(r"[\[=<>]", p)[0] == "langfuse-mw" for p in packages), where


def _export(where: str, line: str, argv: list[str]) -> None:
    from langfuse_mw.config import resolve_settings

    for assignment in argv[1:]:
        name, _, value = assignment.partition("=")
        sources = resolve_settings({}, environ={name: value}).sources
        assert f"env:{name}" in sources.values(), f"{where}: langfuse_mw does not read {name}"


def _langfuse_mw(where: str, line: str, argv: list[str]) -> None:
    from langfuse_mw import cli
    from langfuse_mw.queue import forwarder

    args = argv[1:]
    parser = forwarder.build_parser() if args[:1] == ["forward"] else cli.build_parser()
    if args[:1] == ["forward"]:
        args = args[1:]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: {stderr.getvalue().strip()}"


def _server(where: str, line: str, argv: list[str]) -> None:
    """uvicorn or gunicorn: every option exists, the app is MODULE:NAME, a worker class imports."""
    takes_value = _server_options(argv[0])
    positional: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        option, eq, value = arg.partition("=")
        assert option in takes_value, f"{where}: {argv[0]} has no option {option}"
        if takes_value[option] and not eq:
            value = next(args, "")
        if option in {"-k", "--worker-class"}:
            _import_object(where, value)
    assert len(positional) == 1, f"{where}: expected one MODULE:APP, got {positional}"
    assert re.fullmatch(r"[\w.]+:\w+", positional[0]), f"{where}: not MODULE:APP"


def _server_options(command: str) -> dict[str, bool]:
    """The options of uvicorn's or gunicorn's command line, and whether each takes a value."""
    if command == "uvicorn":
        import click
        from uvicorn.main import main

        return {
            opt: not param.is_flag
            for param in main.params
            if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts)
        }
    from gunicorn.config import KNOWN_SETTINGS

    return {
        opt: setting.action not in {"store_true", "store_false", "store_const", "count"}
        for setting in KNOWN_SETTINGS
        for opt in setting.cli or ()
    }


def _import_object(where: str, dotted: str) -> None:
    import importlib
    import warnings

    module, _, name = dotted.rpartition(".")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = getattr(importlib.import_module(module), name, None)
    assert found is not None, f"{where}: {dotted} does not exist"
    for warning in caught:  # deprecated upstream: say so, but it still works
        print(f"{where}: {warning.category.__name__}: {warning.message}")


def _make(where: str, line: str, argv: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in argv[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no target"


def _python(where: str, line: str, argv: list[str]) -> None:
    import importlib.util

    assert argv[1] == "-m", where
    assert importlib.util.find_spec(argv[2]) is not None, f"{where}: no module {argv[2]}"


_SHELL = {
    "pip": _pip,
    "export": _export,
    "langfuse-mw": _langfuse_mw,
    "uvicorn": _server,
    "gunicorn": _server,
    "make": _make,
    "python": _python,
}


def validate_data(block: Block) -> None:
    try:
        if block.lang == "json":
            json.loads(block.code)
        elif block.lang == "toml":
            tomllib.loads(block.code)
        else:
            import yaml

            yaml.safe_load(block.code)
    except Exception as exc:
        raise AssertionError(f"{block.where}: not valid {block.lang}: {exc}") from exc


# -- isolation --------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated(receiver: Any) -> Iterator[None]:
    """The process as it was afterwards: runtime, environment, logger level, SIGTERM handler."""
    import logging

    from langfuse_mw import runtime

    runtime.shutdown(1.0)
    environ = dict(os.environ)
    logger = logging.getLogger("langfuse_mw")
    level = logger.level
    sigterm = signal.getsignal(signal.SIGTERM)
    sigterm_installed = runtime._sigterm_installed
    os.environ.update(
        LANGFUSE_PUBLIC_KEY=DEV_PUBLIC_KEY,
        LANGFUSE_SECRET_KEY=DEV_SECRET_KEY,
        LANGFUSE_BASE_URL=receiver.url,
    )
    try:
        yield
    finally:
        runtime.shutdown(2.0)
        os.environ.clear()
        os.environ.update(environ)
        logger.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)
        runtime._sigterm_installed = sigterm_installed


if __name__ == "__main__":
    if sys.argv[1:2] == ["django-settings"]:
        sys.exit(_django_settings_main(*sys.argv[2:5]))
    sys.exit(f"usage: {sys.argv[0]} django-settings SETTINGS_FILE PAGE WHERE")
