"""A small asyncio HTTP/1.1 client (one connection per request, `connection: close`) for the
concurrency tests: no third-party dependency, thousands of requests in flight at once."""

import asyncio
import json


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def dechunk(data):
    out, i = bytearray(), 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2:j + 2 + size]
        i = j + 2 + size + 2


async def fetch(port, method, path, body=b"", headers=None, timeout=60):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    body = body or b""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        hdrs = {"host": "gw", "connection": "close", "content-type": "application/json"}
        if body or method == "POST":
            hdrs["content-length"] = str(len(body))
        hdrs.update(headers or {})
        head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in hdrs.items()) + "\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = dechunk(rest)
    return Response(status, headers, rest)
