"""Strict JSON everywhere (issue 7 §3): no NaN/Infinity in anything loratool writes."""

from __future__ import annotations

import ast
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loratool.errors import RegistryError
from loratool.registry.client import RegistryClient
from loratool.registry.retry import RetryPolicy
from tests.conftest import ROOT


def _json_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"
    ]


def test_every_json_dump_in_runtime_code_refuses_nan() -> None:
    """A NaN that reaches any json.dump(s) raises instead of writing ``NaN``; the decoder
    and the registry client keep non-finite numbers from getting there."""
    calls = 0
    for path in sorted((ROOT / "loratool").rglob("*.py")):
        for call in _json_calls(ast.parse(path.read_text(encoding="utf-8"))):
            calls += 1
            strict = any(k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False for k in call.keywords)
            assert strict, f"{path.relative_to(ROOT)}:{call.lineno}: json.{call.func.attr} without allow_nan=False"
    assert calls >= 5


@pytest.mark.parametrize("body", [b'{"id": 1, "stats": {"rating": NaN}}', b'{"items": [Infinity]}', b'[-Infinity]'])
def test_registry_answer_with_nan_is_an_error(body: bytes) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = RegistryClient(f"http://127.0.0.1:{server.server_address[1]}", None, retry=RetryPolicy(attempts=1))
        with pytest.raises(RegistryError, match="non-standard JSON"):
            client.get_json("models/1")
    finally:
        server.shutdown()
        server.server_close()


def test_strict_json_parses_what_we_write(tmp_path: Path) -> None:
    """The PEFT config and diffusers metadata of real conversions are strict JSON."""
    from loratool.ops.convert import convert
    from tests.conftest import FIXTURES

    strict = {"parse_constant": lambda c: pytest.fail(f"{c} in JSON")}
    convert(FIXTURES / "sd15_kohya_lora.safetensors", "peft", tmp_path / "p")
    for config in (tmp_path / "p").rglob("adapter_config.json"):
        json.loads(config.read_text(), **strict)
    convert(FIXTURES / "sd15_kohya_lora.safetensors", "diffusers", tmp_path / "d.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        json.loads(f.metadata()["lora_adapter_metadata"], **strict)
