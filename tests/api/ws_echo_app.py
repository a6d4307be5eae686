"""A notebook cell that serves a WebSocket echo on port 8000 with the standard library alone (the
python3 base image has no ``websockets``): the RFC 6455 handshake and frames, enough for the apps
tests. It echoes text and binary messages; ``headers`` answers the upgrade request's headers as
JSON; ``close N`` closes with code N; ``last-close`` answers the code the previous client closed
with; ``open`` answers how many WebSockets it holds open. It chooses the first subprotocol
offered. A plain GET answers 200."""

WS_ECHO_CELL = r"""
import base64, hashlib, http.server, json, struct, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LAST = {"close": None, "open": 0}
LOCK = threading.Lock()

def read_frame(f):
    head = f.read(2)
    if len(head) < 2:
        return 8, b""  # the connection ended without a close frame
    b1, b2 = head
    n = b2 & 127
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", f.read(8))[0]
    mask = f.read(4) if b2 & 128 else b"\0\0\0\0"
    data = bytes(c ^ mask[i % 4] for i, c in enumerate(f.read(n)))
    return b1 & 15, data

def write_frame(f, op, data):
    n = len(data)
    head = bytes([128 | op]) + (bytes([n]) if n < 126 else
        bytes([126]) + struct.pack("!H", n) if n < 65536 else bytes([127]) + struct.pack("!Q", n))
    f.write(head + data)
    f.flush()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() != "websocket":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            return
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        offered = self.headers.get("Sec-WebSocket-Protocol")
        if offered:
            self.send_header("Sec-WebSocket-Protocol", offered.split(",")[0].strip())
        self.end_headers()
        self.wfile.flush()
        seen = dict(self.headers)
        seen["_path"] = self.path
        with LOCK:
            LAST["open"] += 1
        try:
            self.relay(seen)
        finally:
            with LOCK:
                LAST["open"] -= 1
        self.close_connection = True
    def relay(self, seen):
        while True:
            op, data = read_frame(self.rfile)
            if op == 8:
                LAST["close"] = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                write_frame(self.wfile, 8, data[:2])
                break
            if op == 9:
                write_frame(self.wfile, 10, data)
            elif op == 1 and data == b"headers":
                write_frame(self.wfile, 1, json.dumps(seen).encode())
            elif op == 1 and data == b"open":
                write_frame(self.wfile, 1, str(LAST["open"]).encode())
            elif op == 1 and data == b"last-close":
                write_frame(self.wfile, 1, json.dumps(LAST["close"]).encode())
            elif op == 1 and data.startswith(b"close "):
                write_frame(self.wfile, 8, struct.pack("!H", int(data[6:])))
                read_frame(self.rfile)
                break
            elif op in (1, 2):
                write_frame(self.wfile, op, data)
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer.daemon_threads = True
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("echoing")
"""
