"""The fake OpenAI-compatible upstream of every gateway test (Envoy, nginx, the soak): Python
stdlib (asyncio), one process, several named servers, each on its own 127.0.0.1 port (0 = any
free port).

    python fake_openai.py a1=0 a2=0 b1=18001 ...

Prints one line `READY {"a1": port, ...}` once every server listens, then serves until stdin
closes or the process is killed. HTTP/1.1 with keep-alive (gateways pool upstream connections).
Started and stopped by tests/common/harness_base.py (FakeUpstreams).

Every response carries `x-served-by: <name>`.

POST /v1/chat/completions, /v1/completions and /v1/embeddings answer a JSON echo of what the
server read: `served_by`, `model`, `body_bytes`, `path`, `stream_options` and `received_headers`
(names lower-cased, repeated headers joined with ", "), in the shape of a chat completion
(`choices[].message`), or of a text completion (`choices[].text`) on /v1/completions, with a
vLLM-style `usage` (prompt_tokens = body bytes / 4; `prompt_tokens_details` only with
x-test-cached-tokens, as vLLM reports it only when enabled). With "stream": true in the
body the answer is Server-Sent Events instead, each flushed as its own HTTP chunk, the echo in
the first one; when `stream_options.include_usage` is true (and only then) a last chunk with
empty `choices` and the `usage`, as vLLM sends it; then `data: [DONE]`.

POST /v1/responses answers like vLLM's Responses API, with a store of its own per server (as
vLLM and SGLang keep stored answers in memory): a `previous_response_id` this server did not
answer is a 404 (`invalid_request_error`, "Response with id '…' not found."); otherwise a
response object (`id` "resp_<name>_<n>", `output` one message "hi from <name>", `usage` in the
Responses names: input_tokens = body bytes / 4, `input_tokens_details` with
x-test-cached-tokens, and the echo fields), or with "stream": true its typed events
(`event: <type>` + `data:`): response.created, response.output_item.added,
response.output_text.delta × x-test-chunks ("tok0 ", …), response.completed with the usage; no
[DONE]. Unless `store` is false, the answer is stored at once: GET /v1/responses/{id} returns it
(with `served_by`), DELETE deletes it, GET …/input_items lists nothing, POST …/cancel returns it
"cancelled"; an id this server did not store is a 404.

POST /v1/messages answers like vLLM's Anthropic Messages API: a message (`content`: a text
block "hi from <name>", `usage.input_tokens` = body bytes / 4, the echo fields), or with
"stream": true its typed events: message_start (with the usage and the echo), one text block
of x-test-chunks text_delta events ("tok0 ", …), message_delta (stop_reason, output_tokens),
message_stop, then `data: [DONE]` as vLLM ends it.

POST /generate answers like SGLang's native API: `{"text": "hi from <name>", "output_ids" (1..x-test-chunks), "meta_info":
{prompt_tokens = body bytes / 4, completion_tokens, cached_tokens = x-test-cached-tokens, finish_reason},
…the echo fields}`, or with "stream": true one `data:` event per x-test-chunks token, each with the whole
text and output_ids so far ("tok0 ", "tok0 tok1 ", …; [1], [1, 2], …) and the echo, then `data: [DONE]`.

POST /completion answers like llama.cpp server's native API: `{"content": "tok0 tok1 … ", "stop": true,
"tokens_predicted", "tokens_evaluated" = body bytes / 4, "timings": {"cache_n" = x-test-cached-tokens, "prompt_n",
"predicted_n"}, …the echo}`, or with "stream": true one event per token with only its text, then the last
with `stop` and the counts (no [DONE]).

POST /v2/models/{model}/generate[_stream] answers like Triton's generate extension:
`{"model_name", "model_version", "text_output": "hi from <name> (<n> chars in)"}`, or SSE events
of it, `text_output` "tok0 ", "tok1 ", ...

GET /v1/models and /health answer small JSON documents (with `received_headers`); anything else
is a 404 JSON naming the path and the method.

GET /metrics is what the test made it with `POST /test/metrics` `{"mode", "page"}` to that
server: `page` (200, text/plain, the page given), `growing` (the page given plus vLLM's prompt
and generation token counters, growing by `tokens_per_ms` prompt tokens per ms since the mode was
set), `garbage` (200, an HTML page), `hang` (never answers), `off` (404, as at start).

The test controls the answer with request headers (CONTROL_HEADERS below):

    x-test-delay-ms: N         wait N ms before answering anything (a slow "prefill")
    x-test-status: S           answer status S with an OpenAI-style error JSON
    x-test-close: fin | reset  close the connection without a response byte (FIN), or reset it (RST)
    x-test-chunks: N           a stream has N events (default 5; 3 for Triton's generate_stream)
    x-test-chunk-delay-ms: N   N ms between the events of a stream
    x-test-cached-tokens: N    `usage` reports `prompt_tokens_details.cached_tokens` N (at most
                               prompt_tokens): what the engine says it had cached
    x-test-triton-script: 1    the Triton answer is SCRIPTED_TEXT (with the server's name),
                               streamed in small pieces, every event split across two network
                               chunks; the response header `x-test-triton-request` carries
                               base64(JSON {"path", "body"}) of what the server read
    x-test-triton-error: E     a scripted Triton failure: E = a status (answered with Triton's
                               `{"error": "..."}`), `stream` (an `{"error": ...}` event
                               mid-stream) or `answer` (generate answers 200 with an
                               `{"error": ...}` body)

The order: x-test-delay-ms, then x-test-close, then x-test-status, then the answer.
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

# The request headers a test controls the answer with (see the module doc).
DELAY_MS = "x-test-delay-ms"
STATUS = "x-test-status"
CLOSE = "x-test-close"
CHUNKS = "x-test-chunks"
CHUNK_DELAY_MS = "x-test-chunk-delay-ms"
CACHED_TOKENS = "x-test-cached-tokens"
TRITON_SCRIPT = "x-test-triton-script"
TRITON_ERROR = "x-test-triton-error"
TRITON_REQUEST = "x-test-triton-request"  # response header of a scripted Triton answer
CONTROL_HEADERS = (DELAY_MS, STATUS, CLOSE, CHUNKS, CHUNK_DELAY_MS, CACHED_TOKENS, TRITON_SCRIPT, TRITON_ERROR)

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                 "/generate", "/completion")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class Request:
    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def number(self, header, default=0):
        return int(self.headers.get(header, "") or default)


async def read_request(reader):
    """One HTTP/1.1 request (Content-Length or chunked body); None at the end of the connection."""
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
        name, value = name.strip().lower(), value.strip()
        headers[name] = headers[name] + ", " + value if name in headers else value  # nothing is lost
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


class Responder:
    """Writes one server's answers on one connection."""

    def __init__(self, name, writer):
        self.name, self.writer = name, writer

    async def head(self, status, headers):
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status")), "x-served-by: " + self.name]
        lines += ["%s: %s" % kv for kv in headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        await self.head(status, [("content-type", "application/json"), ("content-length", str(len(body)))]
                        + list(headers))
        self.writer.write(body)
        await self.writer.drain()

    async def start_stream(self, content_type="text/event-stream", headers=()):
        await self.head(200, [("content-type", content_type), ("cache-control", "no-cache"),
                              ("transfer-encoding", "chunked")] + list(headers))

    async def chunk(self, data):
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def event(self, obj):
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        await self.chunk(("data: " + payload + "\n\n").encode())

    async def typed_event(self, kind, obj):
        """An event of the Responses or Messages APIs: `event: <kind>` and `obj` with its `type`."""
        await self.chunk(("event: %s\ndata: %s\n\n" % (kind, json.dumps(dict(obj, type=kind)))).encode())

    async def end_stream(self):
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


def close_now(writer, how):
    """Drops the connection without a response byte: FIN, or RST (`reset`)."""
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    raise ConnectionResetError(CLOSE)


def make_handler(name):
    metrics = {"mode": "off", "page": ""}  # GET /metrics, set by POST /test/metrics
    stored = {}  # the Responses answers this server keeps, by id (/v1/responses)
    made = [0]  # Responses answers made

    async def handle(req, writer):
        out = Responder(name, writer)
        if req.path == "/test/metrics" and req.method == "POST":
            metrics.update(json.loads(req.body or b"{}"))
            metrics["since"] = time.monotonic()
            return await out.json(200, {"served_by": name, "metrics": metrics})
        if req.path == "/metrics" and req.method == "GET" and metrics["mode"] != "off":
            if metrics["mode"] == "hang":
                await asyncio.sleep(3600)
            page = metrics["page"] if metrics["mode"] in ("page", "growing") else "<html><body>no metrics</body></html>"
            if metrics["mode"] == "growing":
                ms = (time.monotonic() - metrics["since"]) * 1000
                page += "vllm:prompt_tokens_total %d\nvllm:generation_tokens_total 0\n" % (ms * metrics["tokens_per_ms"])
            await out.head(200, [("content-type", "text/plain; version=0.0.4"),
                                 ("content-length", str(len(page.encode())))])
            writer.write(page.encode())
            return await writer.drain()
        if req.method == "GET" and req.path.startswith("/v1/models"):
            return await out.json(200, {"object": "list", "data": [{"id": "m-a", "object": "model"}],
                                        "served_by": name, "received_headers": req.headers})
        if req.method == "GET" and req.path.startswith("/health"):
            return await out.json(200, {"status": "ok", "served_by": name, "received_headers": req.headers})
        if req.path.startswith("/v1/responses/"):
            return await on_stored(req, out)
        triton = req.path.startswith("/v2/models/")
        if req.method != "POST" or not (triton or req.path.startswith(OPENAI_ROUTES)):
            return await out.json(404, {"error": {"message": "not found"}, "served_by": name,
                                        "path": req.path, "method": req.method})
        delay = req.number(DELAY_MS) / 1000.0
        if delay:
            await asyncio.sleep(delay)  # "prefill"
        if req.headers.get(CLOSE):
            close_now(writer, req.headers[CLOSE])
        forced = req.number(STATUS)
        if forced:
            return await out.json(forced, {"error": {"message": "forced by %s" % STATUS, "type": "test",
                                                     "code": "forced"}, "served_by": name})
        try:
            payload = json.loads(req.body or b"{}")
        except ValueError:
            payload = {}
        if triton:
            return await answer_triton(req, out, payload)
        if req.path.startswith("/v1/responses"):
            return await answer_responses(req, out, payload)
        if req.path.startswith("/v1/messages"):
            return await answer_messages(req, out, payload)
        if req.path.startswith("/generate"):
            return await answer_generate(req, out, payload)
        if req.path == "/completion":
            return await answer_llama(req, out, payload)
        return await answer_openai(req, out, payload)

    async def answer_messages(req, out, payload):
        usage = {"input_tokens": max(1, len(req.body) // 4), "output_tokens": 3}
        echo = {"served_by": name, "body_bytes": len(req.body), "received_headers": req.headers}
        message = {"id": "msg_%s" % name, "type": "message", "role": "assistant", "model": payload.get("model", ""),
                   "content": [{"type": "text", "text": "hi from " + name}], "stop_reason": "end_turn",
                   "usage": usage, **echo}
        if not payload.get("stream"):
            return await out.json(200, message)

        event = out.typed_event
        chunks = req.number(CHUNKS, 5)
        await out.start_stream()
        await event("message_start", {"message": dict(message, content=[], stop_reason=None,
                                                      usage=dict(usage, output_tokens=0))})
        await event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for i in range(chunks):
            await event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "tok%d " % i}})
        await event("content_block_stop", {"index": 0})
        await event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": chunks}})
        await event("message_stop", {})
        await out.event("[DONE]")
        await out.end_stream()

    async def on_stored(req, out):
        """GET/DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel: this server's own
        stored answers only."""
        rid, _, action = req.path.split("?")[0][len("/v1/responses/"):].partition("/")
        echo = {"served_by": name, "method": req.method, "received_headers": req.headers}
        if rid not in stored:
            return await out.json(404, {"error": {
                "message": "Response with id '%s' not found." % rid, "type": "invalid_request_error",
                "param": "response_id", "code": 404}, **echo})
        if (req.method, action) == ("GET", ""):
            return await out.json(200, dict(stored[rid], **echo))
        if (req.method, action) == ("DELETE", ""):
            del stored[rid]
            return await out.json(200, {"id": rid, "object": "response", "deleted": True, **echo})
        if (req.method, action) == ("GET", "input_items"):
            return await out.json(200, {"object": "list", "data": [], **echo})
        if (req.method, action) == ("POST", "cancel"):
            return await out.json(200, dict(stored[rid], status="cancelled", **echo))
        return await out.json(405, {"error": {"message": "method not allowed"}, **echo})

    async def answer_generate(req, out, payload):
        meta = {"id": "gen_" + name, "prompt_tokens": max(1, len(req.body) // 4), "completion_tokens": 0,
                "cached_tokens": req.number(CACHED_TOKENS), "finish_reason": None}
        echo = {"served_by": name, "body_bytes": len(req.body), "received_headers": req.headers}
        chunks = req.number(CHUNKS, 5)
        if not payload.get("stream"):
            meta.update(completion_tokens=chunks, finish_reason={"type": "stop", "matched": 2})
            return await out.json(200, {"text": "hi from " + name, "output_ids": list(range(1, chunks + 1)),
                                        "meta_info": meta, **echo})
        await out.start_stream()
        text = ""
        for i in range(chunks):
            text += "tok%d " % i  # each event carries the whole text (and ids) so far, as SGLang streams
            last = i + 1 == chunks
            meta.update(completion_tokens=i + 1, finish_reason={"type": "stop"} if last else None)
            await out.event({"text": text, "output_ids": list(range(1, i + 2)), "meta_info": meta, **echo})
        await out.event("[DONE]")
        await out.end_stream()

    async def answer_llama(req, out, payload):
        chunks = req.number(CHUNKS, 5)
        prompt_tokens = max(1, len(req.body) // 4)
        cached = min(req.number(CACHED_TOKENS), prompt_tokens)
        last = {"stop": True, "tokens_predicted": chunks, "tokens_evaluated": prompt_tokens,
                "timings": {"cache_n": cached, "prompt_n": prompt_tokens - cached, "predicted_n": chunks},
                "served_by": name, "received_headers": req.headers}
        if not payload.get("stream"):
            return await out.json(200, dict(last, content="".join("tok%d " % i for i in range(chunks))))
        await out.start_stream()
        for i in range(chunks):  # each event only the new text, as llama.cpp streams it
            await out.event({"content": "tok%d " % i, "stop": False, "served_by": name})
        await out.event(dict(last, content=""))  # no [DONE] on this API
        await out.end_stream()

    async def answer_responses(req, out, payload):
        previous = payload.get("previous_response_id")
        if previous and previous not in stored:
            return await out.json(404, {"error": {
                "message": "Response with id '%s' not found." % previous, "type": "invalid_request_error",
                "param": "previous_response_id", "code": 404}, "served_by": name})
        made[0] += 1
        rid = "resp_%s_%d" % (name, made[0])
        usage = {"input_tokens": max(1, len(req.body) // 4), "output_tokens": 3}
        if req.headers.get(CACHED_TOKENS):
            usage["input_tokens_details"] = {"cached_tokens": min(req.number(CACHED_TOKENS), usage["input_tokens"])}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        message = {"type": "message", "id": "msg_" + rid, "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "hi from " + name, "annotations": []}]}
        response = {"id": rid, "object": "response", "created_at": int(time.time()), "model": payload.get("model", ""),
                    "status": "completed", "output": [message], "usage": usage, "previous_response_id": previous,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "served_by": name, "body_bytes": len(req.body), "received_headers": req.headers}
        if payload.get("store", True):
            stored[rid] = {k: response[k] for k in ("id", "object", "model", "status", "output", "usage")}
        if not payload.get("stream"):
            return await out.json(200, response)

        event = out.typed_event
        await out.start_stream()
        await event("response.created", {"sequence_number": 0, "response": dict(
            response, status="in_progress", output=[], usage=None)})
        await event("response.output_item.added", {"output_index": 0, "item": dict(
            message, status="in_progress", content=[])})
        text = ""
        for i in range(req.number(CHUNKS, 5)):
            text += "tok%d " % i
            await event("response.output_text.delta", {"item_id": message["id"], "output_index": 0,
                                                        "content_index": 0, "delta": "tok%d " % i})
        message["content"][0]["text"] = text
        await event("response.completed", {"response": response})
        await out.end_stream()

    async def answer_openai(req, out, payload):
        model = payload.get("model", "")
        echo = {"served_by": name, "model": model, "body_bytes": len(req.body), "path": req.path,
                "received_headers": req.headers, "stream_options": payload.get("stream_options")}
        completions = req.path.startswith("/v1/completions")
        # token counts as vLLM reports them (prompt: a quarter of the body's bytes)
        usage = {"prompt_tokens": max(1, len(req.body) // 4), "completion_tokens": 0, "total_tokens": 0}
        if req.headers.get(CACHED_TOKENS):
            cached = min(req.number(CACHED_TOKENS), usage["prompt_tokens"])
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if not payload.get("stream"):
            usage.update(completion_tokens=3, total_tokens=usage["prompt_tokens"] + 3)
            echo["usage"] = usage
            if completions:
                return await out.json(200, {
                    "id": "cmpl-test", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": "hi from " + name, "logprobs": None, "finish_reason": "stop"}],
                    **echo})
            return await out.json(200, {
                "id": "cmpl-test", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from " + name},
                             "finish_reason": "stop"}], **echo})
        chunks = req.number(CHUNKS, 5)
        gap = req.number(CHUNK_DELAY_MS) / 1000.0
        await out.start_stream()
        for i in range(chunks):
            ev = {"id": "cmpl-test", "object": "chat.completion.chunk", "model": model,
                  "choices": [{"index": 0, "delta": {"content": "tok%d " % i}}], "t": time.time()}
            if completions:
                ev.update(object="text_completion", choices=[{"index": 0, "text": "tok%d " % i, "finish_reason": None}])
            if i == 0:
                ev.update(echo)
            await out.event(ev)
            if gap and i + 1 < chunks:
                await asyncio.sleep(gap)
        if (payload.get("stream_options") or {}).get("include_usage"):
            # only when asked, after the last content chunk, with empty choices (vLLM, OpenAI)
            usage.update(completion_tokens=chunks, total_tokens=usage["prompt_tokens"] + chunks)
            await out.event({"id": "cmpl-test", "object": "chat.completion.chunk", "model": model,
                             "choices": [], "usage": usage})
        await out.event("[DONE]")
        await out.end_stream()

    async def answer_triton(req, out, payload):
        """Triton generate extension: /v2/models/{model}/generate[_stream]."""
        parts = req.path.split("?")[0].split("/")
        model, verb = parts[3], parts[4]
        if req.headers.get(TRITON_SCRIPT) or req.headers.get(TRITON_ERROR):
            return await answer_triton_scripted(req, out, model, verb, payload)
        if verb == "generate":
            return await out.json(200, {"model_name": model, "model_version": "1", "text_output":
                                        "hi from %s (%d chars in)" % (name, len(payload.get("text_input", "")))})
        await out.start_stream()
        for i in range(req.number(CHUNKS, 3)):
            await out.event({"model_name": model, "model_version": "1", "text_output": "tok%d " % i})
        await out.end_stream()

    async def answer_triton_scripted(req, out, model, verb, payload):
        """A scripted Triton answer (see the module doc)."""
        seen = [(TRITON_REQUEST, base64.b64encode(json.dumps({"path": req.path, "body": payload}).encode()).decode())]
        fail = req.headers.get(TRITON_ERROR, "")
        if fail.isdigit():
            return await out.json(int(fail), {"error": "scripted triton failure %s" % fail}, seen)
        text = SCRIPTED_TEXT % name
        if verb == "generate":
            obj = {"model_name": model, "model_version": "1", "text_output": text}
            if fail == "answer":  # an error object in a 200 answer
                obj = {"error": "scripted triton failure in a 200 answer"}
            return await out.json(200, obj, seen)
        await out.start_stream("text/event-stream; charset=utf-8", seen)
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        if fail == "stream":
            pieces = pieces[:2]
        for i, p in enumerate(pieces):
            event = ("data: " + json.dumps({"model_name": model, "model_version": "1", "text_output": p},
                                           ensure_ascii=False) + "\n\n").encode()
            cut = 1 + (7 * i + 3) % (len(event) - 1)  # each event split elsewhere, never empty
            await out.chunk(event[:cut])
            await asyncio.sleep(0.002)
            await out.chunk(event[cut:])
        if fail == "stream":
            await out.event({"error": "scripted triton failure mid-stream"})
        await out.end_stream()

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
            pass  # the gateway hangs up on purpose in some tests (route timeout, client gone)
        finally:
            try:
                writer.close()
            except Exception:
                pass

    return serve


async def main(specs):
    ports = {}
    for spec in specs:
        name, port = spec.split("=")
        srv = await asyncio.start_server(make_handler(name), "127.0.0.1", int(port), backlog=2048)
        ports[name] = srv.sockets[0].getsockname()[1]
    print("READY " + json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    # run until the parent closes our stdin (or kills us)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or (sys.stdin.buffer.read1(1) or stop.set_result(None)))
    await stop


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
