"""/openapi.json documents every route's bodies and the error shapes kvrun really sends; /docs renders it in a real
headless browser (Debian's chromium, which `make test` installs when missing) with no network beyond the server."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib

import httpx
import msgspec
import pytest

from kvrun.serving.openapi import SWAGGER_ASSETS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def test_openapi_documents_bodies_and_real_error_shapes(shared_server):
    with shared_server.client() as http:
        document = http.get("/openapi.json").json()
        real_openai_error = http.post("/v1/completions", json={"model": "m", "prompt": 1}).json()
        real_tgi_error = http.post("/generate", json={"inputs": ""}).json()
    paths = document["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/", "/generate", "/generate_stream", "/tokenize",
                 "/detokenize", "/v1/models", "/v1/models/{model_id}", "/v1/adapters", "/info", "/metrics", "/health",
                 "/version"):  # fmt: skip
        assert path in paths, path
    chat = paths["/v1/chat/completions"]["post"]
    request_schema = _resolve(document, chat["requestBody"]["content"]["application/json"]["schema"])
    assert {"model", "messages", "max_tokens", "response_format", "min_p"} <= set(request_schema["properties"])
    ok = chat["responses"]["200"]["content"]
    assert set(_resolve(document, ok["application/json"]["schema"])["properties"]) >= {"id", "choices", "usage"}
    assert "text/event-stream" in ok
    compat = paths["/"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert compat["type"] == "array"
    for path, real in (("/v1/completions", real_openai_error), ("/generate", real_tgi_error)):
        error = _resolve(document, paths[path]["post"]["responses"]["400"]["content"]["application/json"]["schema"])
        assert set(error["required"]) == set(real), (path, real)  # the documented shape is the one returned
    for route in ("/v1/models", "/v1/adapters", "/info", "/version"):
        assert paths[route]["get"]["responses"]["200"].get("content"), route
    msgspec.json.encode(document)  # plain JSON through and through


def test_swagger_assets_are_served_locally(shared_server):
    with shared_server.client() as http:
        page = http.get("/docs")
        assert page.status_code == 200 and "/docs/static/swagger-ui-bundle.js" in page.text
        assert "http" not in page.text.split("<body>", 1)[1]  # nothing loads from another host
        for name, media_type in SWAGGER_ASSETS.items():
            asset = http.get(f"/docs/static/{name}")
            assert asset.status_code == 200 and len(asset.content) > 500, name
            assert asset.headers["content-type"].startswith(media_type), name
        assert http.get("/docs/static/../../etc/passwd").status_code == 404
        assert http.get("/docs/static/index.html").status_code == 404


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make test` installs Debian's when apt can reach it")
def test_docs_render_in_headless_chromium(shared_server, tmp_path):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",  # anything off this server fails
               "--dump-dom", f"{shared_server.url}/docs"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    dom = done.stdout
    assert 'class="swagger-ui' in dom, done.stderr[-2000:]
    operations = dom.count('class="opblock opblock-')
    assert operations >= 15, operations  # every documented operation rendered, from /openapi.json
    for path in ("/v1/chat/completions", "/generate_stream", "/tokenize"):
        assert path in dom, path
    screenshot = tmp_path / "docs.png"
    command[command.index("--dump-dom")] = f"--screenshot={screenshot}"
    command.insert(1, "--window-size=1200,1600")
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    # Styled, Swagger UI paints each POST's method badge in its green: an unstyled page has none of it.
    assert _count_pixels(screenshot.read_bytes(), POST_GREEN) > 500
    httpx.get(f"{shared_server.url}/health", timeout=10).raise_for_status()


POST_GREEN = (0x49, 0xCC, 0x90)


def _count_pixels(png: bytes, rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly this colour in an 8-bit RGB(A) PNG (no imaging library needed)."""
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    channels = 3 if colour == 2 else 4
    data, position = b"", 8
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        if kind == b"IDAT":
            data += png[position + 8 : position + 8 + length]
        position += 12 + length
    raw, stride = zlib.decompress(data), width * channels
    previous, count, offset = bytearray(stride), 0, 0
    target = bytes(rgb)
    for _ in range(height):
        kind, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                best = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner))
                line[i] = (line[i] + best[2]) & 0xFF
        count += sum(1 for i in range(0, stride, channels) if line[i : i + 3] == target)
        previous = line
    return count
