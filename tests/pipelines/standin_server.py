"""A STAND-IN for an OpenAI-compatible VLM server (named as such): hostile model outputs on demand.

No real model can be made to return empty, looping, wrong-language, truncated or malformed answers
or to hang on cue, so this small HTTP server does it. It picks a behaviour from the colour of the
image's top-left pixel (BEHAVIOURS below), so a test controls it per image through the shards.
Everything else in the test (Ray, the job, the HTTP client, retries) is real.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

EN_GOOD = "A plain coloured square fills the whole frame, flat and evenly lit, with no other objects."
ZH_GOOD = "一个纯色的方块填满整个画面，光线均匀，没有其他物体。"
EN_TAGS, ZH_TAGS = "square, flat colour, plain background, minimal", "方块, 纯色, 简洁背景"

# top-left pixel colour -> behaviour; the test builds one image per colour
BEHAVIOURS = {  # odd values, so that no hostile test image hits one by accident
    (251, 251, 251): "good",
    (11, 11, 11): "empty",
    (201, 1, 1): "loop",
    (1, 201, 1): "wrong_language",
    (1, 1, 201): "truncated",
    (201, 201, 1): "refusal",
    (201, 1, 201): "malformed",
    (1, 201, 201): "timeout",
    (121, 61, 1): "flaky",  # HTTP 500 once per request text, then good: exercises retry with backoff
    (61, 1, 121): "zh_wrong",  # good English, English again for Chinese: a partial row
    (31, 31, 201): "trickle",  # a good answer, one byte every `trickle_s`: only a whole-request deadline ends it
    (31, 201, 31): "null_content",  # "content": null
    (31, 31, 31): "list_content",  # "content": ["a", "list"]
    (61, 121, 1): "number_content",  # "content": 42
    (1, 61, 121): "huge",  # a 5 MiB caption
    (121, 1, 61): "empty_body",  # HTTP 200 with no body at all
    (1, 121, 61): "surrogate",  # "content": "\ud800": JSON, but not text that UTF-8 can hold
}
HUGE_BYTES = 5 << 20


class Trickle(str):
    """An answer body the handler sends one byte at a time."""


class StandInServer:
    def __init__(self, hang_s: float = 5.0, trickle_s: float = 0.25):
        self.hang_s = hang_s
        self.trickle_s = trickle_s
        self.calls: list[str] = []
        self._seen_flaky: set[str] = set()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body: dict) -> tuple[int, str | dict]:
        content = body["messages"][-1]["content"]
        text = next(c["text"] for c in content if c["type"] == "text")
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        behaviour = BEHAVIOURS.get(im.getpixel((0, 0)), "good")
        zh = "Simplified Chinese" in text
        tags = text.startswith("List ")
        with self._lock:
            self.calls.append(behaviour)
        good = (ZH_TAGS if zh else EN_TAGS) if tags else (ZH_GOOD if zh else EN_GOOD)
        finish = "stop"
        if behaviour == "empty":
            out = ""
        elif behaviour == "loop":
            out = "the red square " * 40
        elif behaviour == "wrong_language":
            out = EN_GOOD if zh else ZH_GOOD
        elif behaviour == "zh_wrong":
            out = EN_GOOD
        elif behaviour == "truncated":
            out, finish = good[: len(good) // 2], "length"
        elif behaviour == "refusal":
            out = "I'm sorry, but I can't help with describing this image."
        elif behaviour == "malformed":
            return 200, "<html>this is not the JSON you asked for</html>"
        elif behaviour == "empty_body":
            return 200, ""
        elif behaviour == "huge":
            out = "a" * HUGE_BYTES
        elif behaviour in ("null_content", "list_content", "number_content"):
            out = {"null_content": None, "list_content": ["a", "list"], "number_content": 42}[behaviour]
        elif behaviour == "surrogate":
            out = "\ud800"
        elif behaviour == "timeout":
            time.sleep(self.hang_s)
            out = good
        elif behaviour == "flaky":
            with self._lock:
                first = text + url[-64:] not in self._seen_flaky
                self._seen_flaky.add(text + url[-64:])
            if first:
                return 500, {"error": "stand-in transient failure"}
            out = good
        else:
            out = good
        answer = {
            "id": "standin",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(str(out)) // 4), "total_tokens": 0},
        }
        return 200, Trickle(json.dumps(answer)) if behaviour == "trickle" else answer

    def _handler(server_self):  # noqa: N805 - closes over the StandInServer
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if isinstance(payload, Trickle):
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(server_self.trickle_s)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "standin-vlm", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*server_self.answer(body))

        return Handler
