"""OpenAI-compatible test servers (Python stdlib only) for the Envoy end-to-end tests.

One process serves several named servers, each on its own 127.0.0.1 port:

    python openai_server.py a1=18001 a2=18002 ...

Every response carries `x-served-by: <name>`. POST /v1/chat/completions and /v1/completions
answer JSON, or Server-Sent Events when the body says "stream": true (events are flushed one
by one, `x-test-chunk-delay-ms` apart, `x-test-chunks` of them). Any answer starts after
`x-test-first-delay-ms` (a "prefill"). The JSON answer echoes what
the server received (headers, body size, model) so tests can check what Envoy forwarded.
POST /v2/models/<model>/generate[_stream] speaks Triton's generate extension ({"text_output"}).
With `x-test-triton-script: 1` the Triton answer is SCRIPTED_TEXT (below, with the server's
name), streamed in small pieces with events split across network chunks, and the response
header `x-test-triton-request` carries base64(JSON {"path", "body"}) of what the server read;
`x-test-triton-error: <status>` answers that status with Triton's `{"error": "..."}`, and
`x-test-triton-error: stream` fails mid-stream with an `{"error": ...}` event, and
`x-test-triton-error: answer` answers generate with 200 and an `{"error": ...}` body.
POST /v1/completions answers in `text_completion` shape (`choices[].text`).
GET /v1/models and /health answer too. Prints "READY" once every port listens.
"""

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What a scripted Triton answer says (multi-byte UTF-8 on purpose); %s is the server's name.
SCRIPTED_TEXT = "Héllo from %s: wörld ✓ done"


def make_handler(name):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llmproxy-test"

        def log_message(self, *args):  # keep the test output clean
            pass

        def _read_body(self):
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("content-length", "0") or 0)
            return self.rfile.read(n) if n else b""

        def _headers_seen(self):
            seen = {}
            for k, v in self.headers.items():  # repeated headers are joined, nothing is lost
                k = k.lower()
                seen[k] = seen[k] + ", " + v if k in seen else v
            return seen

        def _send_json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-served-by", name)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.startswith("/v1/models"):
                self._send_json(200, {"object": "list", "data": [{"id": "m-a", "object": "model"}],
                                      "served_by": name})
            elif self.path.startswith("/health"):
                self._send_json(200, {"status": "ok", "served_by": name})
            else:
                self._send_json(404, {"error": {"message": "not found"}, "served_by": name})

        def do_POST(self):
            raw = self._read_body()
            if self.path.startswith("/v2/models/"):
                self._triton(raw)
                return
            if not self.path.startswith(("/v1/chat/completions", "/v1/completions", "/v1/embeddings")):
                self._send_json(404, {"error": {"message": "not found"}, "served_by": name})
                return
            try:
                req = json.loads(raw or b"{}")
            except ValueError:
                req = {}
            model = req.get("model", "")
            time.sleep(int(self.headers.get("x-test-first-delay-ms", "0")) / 1000.0)  # "prefill"
            echo = {
                "served_by": name,
                "model": model,
                "body_bytes": len(raw),
                "received_headers": self._headers_seen(),
            }
            if req.get("stream"):
                self._stream(model, echo, self.path.startswith("/v1/completions"))
                return
            if self.path.startswith("/v1/completions"):
                self._send_json(200, {
                    "id": "cmpl-test", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": "hi from " + name, "logprobs": None,
                                 "finish_reason": "stop"}],
                    **echo,
                })
                return
            self._send_json(200, {
                "id": "cmpl-test", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from " + name},
                             "finish_reason": "stop"}],
                **echo,
            })

        def _triton(self, raw):
            """Triton generate extension: /v2/models/<model>/generate[_stream]."""
            parts = self.path.split("/")
            model, verb = parts[3], parts[4]
            req = json.loads(raw or b"{}")
            if self.headers.get("x-test-triton-script") or self.headers.get("x-test-triton-error"):
                self._triton_scripted(model, verb, req)
                return
            pieces = ["echo:", str(len(req.get("text_input", ""))), "from", name]
            if verb == "generate":
                self._send_json(200, {"model_name": model, "model_version": "1", "text_output": " ".join(pieces)})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-served-by", name)
            self.end_headers()
            for p in pieces:
                data = ("data: " + json.dumps({"model_name": model, "model_version": "1", "text_output": p + " "})
                        + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _triton_scripted(self, model, verb, req):
            """A scripted Triton answer (see the module doc)."""
            seen = base64.b64encode(json.dumps({"path": self.path, "body": req}).encode()).decode()
            fail = self.headers.get("x-test-triton-error", "")
            if fail.isdigit():
                body = json.dumps({"error": "scripted triton failure %s" % fail}).encode()
                self.send_response(int(fail))
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-served-by", name)
                self.send_header("x-test-triton-request", seen)
                self.end_headers()
                self.wfile.write(body)
                return
            text = SCRIPTED_TEXT % name
            if verb == "generate":
                obj = {"model_name": model, "model_version": "1", "text_output": text}
                if fail == "answer":  # an error object in a 200 answer
                    obj = {"error": "scripted triton failure in a 200 answer"}
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-served-by", name)
                self.send_header("x-test-triton-request", seen)
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-served-by", name)
            self.send_header("x-test-triton-request", seen)
            self.end_headers()

            def write_chunk(data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
            if fail == "stream":
                pieces = pieces[:2]
            for i, p in enumerate(pieces):
                event = ("data: " + json.dumps({"model_name": model, "model_version": "1", "text_output": p},
                                               ensure_ascii=False) + "\n\n").encode()
                cut = 1 + (7 * i + 3) % (len(event) - 1)  # each event split elsewhere, never empty
                write_chunk(event[:cut])
                time.sleep(0.002)
                write_chunk(event[cut:])
            if fail == "stream":
                write_chunk(b'data: {"error": "scripted triton failure mid-stream"}\n\n')
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _stream(self, model, echo, completions=False):
            chunks = int(self.headers.get("x-test-chunks", "5"))
            delay = int(self.headers.get("x-test-chunk-delay-ms", "0")) / 1000.0
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-served-by", name)
            self.end_headers()

            def write_event(payload):
                data = ("data: " + payload + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            for i in range(chunks):
                event = {"id": "cmpl-test", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}],
                         "t": time.time()}
                if completions:
                    event.update(object="text_completion",
                                 choices=[{"index": 0, "text": "tok%d " % i, "finish_reason": None}])
                if i == 0:
                    event.update(echo)
                write_event(json.dumps(event))
                if delay and i + 1 < chunks:
                    time.sleep(delay)
            write_event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # The gateway hangs up on purpose in some tests (route timeout, client gone): no traceback.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def main(argv):
    servers = []
    for spec in argv:
        name, port = spec.split("=")
        srv = QuietServer(("127.0.0.1", int(port)), make_handler(name))
        srv.daemon_threads = True
        servers.append(srv)
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("READY", flush=True)
    try:
        sys.stdin.read()  # run until the parent closes stdin or kills us
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
