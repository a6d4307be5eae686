"""The program of envctl's attach helper tasks on a Swarm node (``swarm_attach``): run as
``python3 -I -c HELPER MODE NODE_ID ...`` in the ``bash`` base image (standard library only),
with the node's Docker socket bound at ``ENGINE``. It first checks that the socket is that
node's own engine (``GET /info``: its swarm node id), so a wrong socket path never reaches
another engine; then:

- ``find NODE REF``: the container of that id or name on the node, as one JSON line (no
  variables: they may hold the container's secrets), with whether ``python3`` is on its PATH
  (a ``HEAD`` of the archive API: a read, no process in the container);
- ``relay NODE CID DIR LISTEN``: the bootstrap of ``agent_bootstrap`` by ``docker exec`` with its
  line on standard input (the agent's files from the task's configs, the credential from its
  secret, a tmpfs file), then a TCP relay on the node's ``LISTEN`` address to the agent in the
  container (its address on a network of the node, or the node's loopback for a container
  on the host network); it prints the pids and the relay's port, then watches the container:
  gone, stopped or restarted, it ends (the attach is over); on SIGTERM it ends the agent first;
- ``stop NODE CID DIR REAPER AGENT``: the stopper of ``agent_bootstrap`` by ``docker exec``;
  prints its answer;
- ``netmake NODE NAME SUBNET GATEWAY LABELS``: the config-only network ``NAME`` of
  ``swarm_subnets`` on the node (``enable_icc=false``, that subnet, the JSON ``LABELS``), unless
  it is there already with that subnet; a network of the node whose subnet overlaps it is
  answered as ``overlap`` and nothing is made;
- ``netrm NODE INSTALLATION [NAME]``: the node's config-only networks labelled as that
  installation's (``envctl.managed=network-config``; only ``NAME`` when given) removed, each
  asked again for a while when still in use; answers what went and what stayed.
"""

from __future__ import annotations

from runner.backends.agent_bootstrap import BOOTSTRAP, PYTHON, STOPPER
from runner.backends.base import AGENT_MOUNT, AGENT_PORT, LABEL_INSTALLATION, LABEL_MANAGED

ENGINE = "/run/envctl-engine.sock"  # where the node's socket is bound in the helper
CREDENTIAL = "/run/envctl/attach.key"  # the relay's secret (the attach's credential line)
CONFIG_ROLE = "network-config"  # LABEL_MANAGED of a config-only network (swarm_subnets)
ICC_OPTION = "com.docker.network.bridge.enable_icc"

_PROGRAM = r"""
import http.client, ipaddress, json, os, signal, socket, struct, sys, threading, time
from urllib.parse import quote
ENGINE, CREDENTIAL, AGENT = %(engine)r, %(credential)r, %(agent)r
INSTALLATION, MANAGED, CONFIG_ROLE, ICC = %(installation)r, %(managed)r, %(config_role)r, %(icc)r
BOOTSTRAP, STOPPER, PYTHON = %(bootstrap)r, %(stopper)r, %(python)r
mode, node = sys.argv[1], sys.argv[2]
def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
class Engine(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.settimeout(30); self.sock.connect(ENGINE)
def call(method, path, body=None):
    h = Engine("localhost", timeout=30)
    data = None if body is None else json.dumps(body)
    h.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = h.getresponse(); data = r.read(); h.close()
    return r.status, (json.loads(data) if data[:1] in (b"{", b"[") else data)
def execute(cid, cmd, stdin=None, first_line=False, timeout=20.0):
    st, made = call("POST", "/containers/%%s/exec" %% quote(cid), {"AttachStdin": stdin is not None,
        "AttachStdout": True, "AttachStderr": True, "Tty": False, "Cmd": cmd})
    if st != 201:
        raise RuntimeError("docker exec: %%s %%s" %% (st, made))
    s = socket.socket(socket.AF_UNIX); s.settimeout(timeout); s.connect(ENGINE)
    body = b'{"Detach": false, "Tty": false}'
    head = (b"POST /exec/%%s/start HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: %%d\r\n\r\n")
    s.sendall(head %% (made["Id"].encode(), len(body)) + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("docker exec: the engine closed the stream")
        raw += chunk
    head, _, raw = raw.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n")[0] and b" 200 " not in head.split(b"\r\n")[0]:
        raise RuntimeError("docker exec: " + head.split(b"\r\n")[0].decode(errors="replace"))
    if stdin is not None:
        s.sendall(stdin)
    out = b""
    try:
        while True:
            while len(raw) >= 8 and len(raw) >= 8 + struct.unpack(">I", raw[4:8])[0]:
                size = struct.unpack(">I", raw[4:8])[0]
                if raw[0] == 1:
                    out += raw[8:8 + size]
                raw = raw[8 + size:]
            if first_line and b"\n" in out:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    finally:
        s.close()
    return out.decode(errors="replace")
def inspect(ref):
    st, c = call("GET", "/containers/%%s/json" %% quote(ref, safe=""))
    return c if st == 200 else None
def same(c, started):
    return c is not None and c["State"].get("Running") and c["State"].get("StartedAt") == started
def stop(cid, d, reaper, agent):
    out = execute(cid, [*PYTHON, STOPPER, d, str(reaper), str(agent)])
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "the stopper said: " + out[-300:]}
try:
    st, info = call("GET", "/info")
except OSError as exc:
    say(error="envctl's helper on node %%s cannot reach the Docker socket given to it: %%s" %% (node, exc)); sys.exit(2)
mine = ((info or {}).get("Swarm") or {}).get("NodeID") if st == 200 else None
if mine != node:
    say(error="the Docker socket given to envctl's helper on node %%s is not that node's engine (its swarm "
        "node: %%s); set the node label envctl.engine-socket to the node's socket path" %% (node, mine or "none"))
    sys.exit(2)
if mode == "find":
    c = inspect(sys.argv[3])
    if c is None:
        say(node=node, found=None); sys.exit(0)
    cfg, hc = c.get("Config") or {}, c.get("HostConfig") or {}
    path = [e[5:] for e in cfg.get("Env") or [] if e.startswith("PATH=")]
    python = False
    for d in (path[0] if path else "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        where = "/containers/%%s/archive?path=%%s" %% (c["Id"], quote(d.rstrip("/") + "/python3"))
        if d.startswith("/") and call("HEAD", where)[0] == 200:
            python = True; break
    state = c.get("State") or {}
    say(node=node, found={"id": c["Id"], "name": c["Name"].lstrip("/"), "labels": cfg.get("Labels") or {},
        "running": bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting"),
        "working_dir": cfg.get("WorkingDir") or "", "user": cfg.get("User") or "", "python": python,
        "network_mode": hc.get("NetworkMode") or ""})
elif mode == "stop":
    cid, d, reaper, agent = sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    c = inspect(cid)
    if c is not None and c["State"].get("Running"):
        say(**stop(cid, d, reaper, agent))
    else:
        say(left=[], dir_left=False, container="not running")
elif mode == "relay":
    cid, d, listen = sys.argv[3], sys.argv[4], sys.argv[5]
    c = inspect(cid)
    if c is None or not c["State"].get("Running"):
        say(error="the container is not running"); sys.exit(1)
    started = c["State"].get("StartedAt")
    files = {n: open(os.path.join(AGENT, n)).read() for n in sorted(os.listdir(AGENT)) if n.endswith(".py")}
    line = json.dumps({"files": files, "credential": open(CREDENTIAL).read(), "port": %(port)d}) + "\n"
    try:
        out = execute(cid, [*PYTHON, BOOTSTRAP, d], line.encode(), first_line=True)
        said = json.loads(out.splitlines()[0])
    except (ValueError, IndexError, RuntimeError, OSError) as exc:
        said = {"error": "the bootstrap did not answer: %%s" %% exc}
    del line
    if "error" in said:
        say(error=said["error"]); sys.exit(1)
    reaper, agent, port = int(said["reaper"]), int(said["agent"]), int(said["port"])
    if (c.get("HostConfig") or {}).get("NetworkMode") == "host":
        addresses = ["127.0.0.1"]
    else:
        nets = ((c.get("NetworkSettings") or {}).get("Networks") or {}).values()
        addresses = [n.get("IPAddress") for n in nets if n.get("IPAddress")]
    target, end = None, time.monotonic() + 10
    while target is None and time.monotonic() < end:
        for ip in addresses:
            try:
                socket.create_connection((ip, port), timeout=1).close(); target = ip; break
            except OSError:
                pass
        else:
            time.sleep(0.1)
    if target is None:
        stop(cid, d, reaper, agent)
        some = ", ".join(addresses) or "none: the container has no network the node reaches"
        say(error="the node cannot reach the agent in the container at any of its addresses (%%s)" %% some)
        sys.exit(1)
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((listen, 0)); srv.listen(64)
    def pump(a, b, pair):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with pair[0]:
            pair[1] -= 1
            if pair[1] == 0:
                a.close(); b.close()
    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((target, port), timeout=5); up.settimeout(None)
            except OSError:
                conn.close(); continue
            for x in (conn, up):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = [threading.Lock(), 2]
            threading.Thread(target=pump, args=(conn, up, pair), daemon=True).start()
            threading.Thread(target=pump, args=(up, conn, pair), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    say(reaper=reaper, agent=agent, port=srv.getsockname()[1], inner_port=port, target=target)
    ending = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: ending.set())
    while not ending.wait(2):
        try:
            now = inspect(cid)
        except OSError:
            continue
        if not same(now, started):
            say(gone="the container stopped, was removed or restarted")
            break
    now = inspect(cid)  # a restarted container may keep its /dev/shm: the directory goes too
    if now is not None and now["State"].get("Running"):
        say(stopped=stop(cid, d, reaper, agent))
elif mode == "netmake":
    name, subnet, gateway, labels = sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
    want = ipaddress.ip_network(subnet)
    st, nets = call("GET", "/networks")
    if st != 200:
        say(error="node %%s: the engine did not list its networks (%%s)" %% (node, st)); sys.exit(1)
    for n in nets:
        have = [c.get("Subnet") for c in (n.get("IPAM") or {}).get("Config") or []]
        if n.get("Name") == name:
            owner = (n.get("Labels") or {}).get(INSTALLATION)
            if n.get("ConfigOnly") and have == [subnet] and owner == labels.get(INSTALLATION):
                say(node=node, made=False); sys.exit(0)
            say(error="node %%s has a network %%s that is not envctl's configuration for subnet %%s"
                %% (node, name, subnet)); sys.exit(1)
        if (n.get("ConfigFrom") or {}).get("Network") == name:
            continue  # the swarm network made from it, on this node
        for s in have:
            try:
                other = ipaddress.ip_network(s or "", strict=False)
            except ValueError:
                continue
            if other.version == 4 and other.overlaps(want):
                say(node=node, overlap="%%s (%%s)" %% (n.get("Name"), other), subnet=str(other)); sys.exit(0)
    st, out = call("POST", "/networks/create", {"Name": name, "ConfigOnly": True, "CheckDuplicate": True,
        "Driver": "bridge", "Options": {ICC: "false"}, "Labels": labels,
        "IPAM": {"Driver": "default", "Config": [{"Subnet": subnet, "Gateway": gateway}]}})
    if st not in (200, 201, 409):  # 409: made at the same moment by another boot of ours
        say(error="node %%s refused the configuration network %%s: %%s" %% (node, name, out)); sys.exit(1)
    say(node=node, made=st != 409)
elif mode == "netrm":
    inst, only = sys.argv[3], (sys.argv[4] if len(sys.argv) > 4 else "")
    wanted = json.dumps({"label": ["%%s=%%s" %% (INSTALLATION, inst), "%%s=%%s" %% (MANAGED, CONFIG_ROLE)]})
    st, nets = call("GET", "/networks?filters=" + quote(wanted))
    if st != 200:
        say(error="node %%s: the engine did not list its networks (%%s)" %% (node, st)); sys.exit(1)
    gone, left = [], []
    for n in nets:
        labels = n.get("Labels") or {}
        if not n.get("ConfigOnly") or labels.get(INSTALLATION) != inst or labels.get(MANAGED) != CONFIG_ROLE:
            continue
        if only and n.get("Name") != only:
            continue
        end = time.monotonic() + 30  # in use until the node has dropped the swarm network made from it
        while True:
            st, out = call("DELETE", "/networks/" + quote(n["Id"]))
            if st in (200, 204, 404):
                gone.append(n["Name"]); break
            if time.monotonic() > end:
                left.append("%%s (%%s)" %% (n["Name"], out)); break
            time.sleep(0.5)
    say(node=node, removed=gone, left=left)
else:
    say(error="unknown mode " + mode); sys.exit(2)
"""

HELPER = _PROGRAM % {
    "engine": ENGINE,
    "credential": CREDENTIAL,
    "agent": AGENT_MOUNT,
    "port": AGENT_PORT,
    "bootstrap": BOOTSTRAP,
    "stopper": STOPPER,
    "python": list(PYTHON),
    "installation": LABEL_INSTALLATION,
    "managed": LABEL_MANAGED,
    "config_role": CONFIG_ROLE,
    "icc": ICC_OPTION,
}
