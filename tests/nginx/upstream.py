"""OpenAI-compatible test upstreams for the nginx tests: Python stdlib (asyncio), one process,
several named servers, each on its own 127.0.0.1 port (0 = any free port).

    python upstream.py a1=0 a2=0 b1=18001 ...

Prints one line `READY {"a1": port, ...}` once every server listens, then serves until stdin
closes or the process is killed. HTTP/1.1 with keep-alive (nginx pools upstream connections).

Every response carries `x-served-by: <name>`.
POST /v1/chat/completions and /v1/completions answer a JSON echo (served_by, model, body_bytes,
received headers) after `x-test-delay-ms`, or Server-Sent Events when the body says
"stream": true: `x-test-chunks` events (default 5) `x-test-chunk-delay-ms` apart, each flushed
as its own HTTP chunk, then `data: [DONE]`. `x-test-status: 503` answers that status instead.
`x-test-close: 1` (after `x-test-delay-ms`) closes the connection without a response byte,
`x-test-close: reset` resets it (RST).
POST /v2/models/{model}/generate[_stream] answers like Triton's generate extension
(`{"model_name", "model_version", "text_output"}`, or SSE events of them). With
`x-test-triton-script: 1` the answer is SCRIPTED_TEXT (with the server's name), streamed in small
pieces with every event split across two network chunks, and the response header
`x-test-triton-request` carries base64(JSON {"path", "body"}) of what the server read;
`x-test-triton-error: <status>` answers that status with Triton's `{"error": "..."}`, and
`x-test-triton-error: stream` fails mid-stream with an `{"error": ...}` event, and
`x-test-triton-error: answer` answers generate with 200 and an `{"error": ...}` body.
POST /v1/completions answers in `text_completion` shape (`choices[].text`).
GET /v1/models and /health answer small JSON documents (with the headers they received).
"""

import asyncio
import base64
import json
import socket
import struct
import sys
import time

# What a scripted Triton answer says (multi-byte UTF-8 on purpose); %s is the server's name.
SCRIPTED_TEXT = "Héllo from %s: wörld ✓ done"

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Request:
    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body


async def read_request(reader):
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError("bad request line %r" % line)
    method, path, _ = parts
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readline()
        body = bytes(body)
    else:
        n = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(n) if n else b""
    return Request(method, path, headers, body)


def head(status, headers):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway",
              503: "Service Unavailable"}.get(status, "Status")
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def make_handler(name):
    async def send_json(writer, status, obj):
        body = json.dumps(obj).encode()
        writer.write(head(status, [("content-type", "application/json"),
                                   ("content-length", str(len(body))), ("x-served-by", name)]) + body)
        await writer.drain()

    async def handle(req, writer):
        if req.method == "GET" and req.path.startswith("/v1/models"):
            return await send_json(writer, 200, {"object": "list", "data": [{"id": "m-a"}], "served_by": name,
                                                 "received_headers": req.headers})
        if req.method == "GET" and req.path.startswith("/health"):
            return await send_json(writer, 200, {"status": "ok", "served_by": name, "received_headers": req.headers})
        if req.method == "POST" and req.path.startswith("/v2/models/"):
            return await triton(req, writer)
        if req.method != "POST" or not req.path.startswith(ROUTES):
            return await send_json(writer, 404, {"error": {"message": "not found"}, "served_by": name,
                                                 "path": req.path, "method": req.method})
        forced = int(req.headers.get("x-test-status", "0") or 0)
        if forced:
            return await send_json(writer, forced, {"error": {"message": "forced"}, "served_by": name})
        try:
            payload = json.loads(req.body or b"{}")
        except ValueError:
            payload = {}
        echo = {"served_by": name, "model": payload.get("model", ""), "body_bytes": len(req.body),
                "path": req.path, "received_headers": req.headers}
        delay = int(req.headers.get("x-test-delay-ms", "0") or 0) / 1000.0
        if delay:
            await asyncio.sleep(delay)
        close = req.headers.get("x-test-close", "")
        if close:
            if close == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            raise ConnectionResetError("x-test-close")
        completions = req.path.startswith("/v1/completions")
        if completions and not payload.get("stream"):
            return await send_json(writer, 200, {
                "id": "cmpl-test", "object": "text_completion", "created": 0, "model": echo["model"],
                "choices": [{"index": 0, "text": "hi from " + name, "logprobs": None, "finish_reason": "stop"}],
                **echo})
        if not payload.get("stream"):
            return await send_json(writer, 200, {
                "id": "cmpl-test", "object": "chat.completion", "model": echo["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from " + name},
                             "finish_reason": "stop"}], **echo})
        chunks = int(req.headers.get("x-test-chunks", "5"))
        gap = int(req.headers.get("x-test-chunk-delay-ms", "0")) / 1000.0
        writer.write(head(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                                ("transfer-encoding", "chunked"), ("x-served-by", name)]))

        async def event(data):
            data = ("data: " + data + "\n\n").encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        for i in range(chunks):
            ev = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}],
                  "t": time.time()}
            if completions:
                ev.update(object="text_completion", choices=[{"index": 0, "text": "tok%d " % i, "finish_reason": None}])
            if i == 0:
                ev.update(echo)
            await event(json.dumps(ev))
            if gap and i + 1 < chunks:
                await asyncio.sleep(gap)
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def triton(req, writer):
        """Triton generate extension: /v2/models/{model}/generate[_stream]."""
        parts = req.path.split("?")[0].split("/")
        model, verb = parts[3], parts[4]
        payload = json.loads(req.body or b"{}")
        if req.headers.get("x-test-triton-script") or req.headers.get("x-test-triton-error"):
            return await triton_scripted(req, writer, model, verb, payload)
        if verb == "generate":
            return await send_json(writer, 200, {"model_name": model, "model_version": "1",
                                                 "text_output": "hi from %s (%d chars in)" % (name, len(payload.get("text_input", "")))})
        chunks = int(req.headers.get("x-test-chunks", "3"))
        writer.write(head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked"),
                                ("x-served-by", name)]))
        for i in range(chunks):
            data = ("data: " + json.dumps({"model_name": model, "model_version": "1",
                                           "text_output": "tok%d " % i}) + "\n\n").encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def triton_scripted(req, writer, model, verb, payload):
        """A scripted Triton answer (see the module doc)."""
        seen = base64.b64encode(json.dumps({"path": req.path, "body": payload}).encode()).decode()
        fail = req.headers.get("x-test-triton-error", "")
        if fail.isdigit() or verb == "generate":
            status = int(fail) if fail.isdigit() else 200
            obj = ({"error": "scripted triton failure %s" % fail} if fail.isdigit()
                   else {"error": "scripted triton failure in a 200 answer"} if fail == "answer"
                   else {"model_name": model, "model_version": "1", "text_output": SCRIPTED_TEXT % name})
            body = json.dumps(obj).encode()
            writer.write(head(status, [("content-type", "application/json"), ("content-length", str(len(body))),
                                       ("x-served-by", name), ("x-test-triton-request", seen)]) + body)
            return await writer.drain()
        writer.write(head(200, [("content-type", "text/event-stream; charset=utf-8"),
                                ("transfer-encoding", "chunked"), ("x-served-by", name),
                                ("x-test-triton-request", seen)]))

        async def chunk(data):
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        text = SCRIPTED_TEXT % name
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        if fail == "stream":
            pieces = pieces[:2]
        for i, p in enumerate(pieces):
            event = ("data: " + json.dumps({"model_name": model, "model_version": "1", "text_output": p},
                                           ensure_ascii=False) + "\n\n").encode()
            cut = 1 + (7 * i + 3) % (len(event) - 1)  # each event split elsewhere, never empty
            await chunk(event[:cut])
            await asyncio.sleep(0.002)
            await chunk(event[cut:])
        if fail == "stream":
            await chunk(b'data: {"error": "scripted triton failure mid-stream"}\n\n')
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def serve(reader, writer):
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    break
                await handle(req, writer)
                if req.headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    return serve


async def main(specs):
    ports = {}
    servers = []
    for spec in specs:
        name, port = spec.split("=")
        srv = await asyncio.start_server(make_handler(name), "127.0.0.1", int(port), backlog=2048)
        servers.append(srv)
        ports[name] = srv.sockets[0].getsockname()[1]
    print("READY " + json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    # run until the parent closes our stdin (or kills us)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or (sys.stdin.buffer.read1(1) or stop.set_result(None)))
    await stop


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
