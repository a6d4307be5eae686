"""The shell of a Bash-only attach on the kubernetes backend (runner/runtimes/attach.py): a pod
whose container has no ``python3`` has nothing to run envctl's agent on, so the agent runs on
envctl's host (as the local engine's attach does) and its Bash kernel's "process" is this
relay, run as ``python -m runner.backends.kube_shell CONFIG CONTEXT NAMESPACE POD CONTAINER
PIDS``. It opens one long-lived ``pods/exec`` stream of the container's ``bash --noprofile
--norc`` (``sh`` when it has no bash) and relays its own standard input to the shell's and the
shell's stdout and stderr to its own; the kernel (``runner/agent/kernels.py``,
``StreamBashKernel``) writes each cell with an end marker and reads up to it. The shell runs
in the container's namespaces, cgroups, user, variables and working directory, as any exec'd
process does; nothing is written into the container.

The shell's pid in the container and its start time are appended to ``PIDS`` (a file of the
runtime's private state directory on envctl's host), so that a detach ends every shell this
attach started, also one left by an envctl or agent that died meanwhile (``end_script``).

SIGINT (the agent's interrupt) becomes a second short exec that sends SIGINT to the shell and
its descendants in the container (found through ``/proc``: no ``pkill`` needed; a busybox or
Debian container alike); SIGTERM (a detach, the kernel's end) kills the descendants, has the
shell reap them and exit, then ends the relay (``Relay.end``; see ``SIGNAL`` for why in that
order: the container's pid 1 may never reap an orphan). The credentials are
envctl's own (its kubeconfig, or a pod's in-cluster token), loaded again here: nothing goes
into the pod's spec, variables or annotations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from envs.kit.errors import EnvctlError
from runner.backends.kube_api import KubeApi

# Starts the shell: first its own pid and start time (the 22nd field of /proc/PID/stat), on a
# line of their own, then ``exec``: the shell keeps that pid.
START = (
    'read -r s < /proc/$$/stat; s=${s##*) }; set -- $s; echo "envctl-shell $$ ${20}"; '
    "if command -v bash >/dev/null 2>&1; then exec bash --noprofile --norc; fi; exec sh"
)

# ``sh -c SIGNAL sh MODE PID START [PID START ...]``, on each listed shell still running with
# that start time (a pid reused by something else is left alone) and its descendants, found
# through /proc (zombies aside). INT: SIGINT to all at once (an interrupt). END and KILL: the
# descendants killed leaves first, each round waiting until their parents reaped them (an
# orphan goes to the container's pid 1, which may never reap it); the shells' own children
# are reaped by the shells (END: SIGINT to the shell, whose relay then has it ``wait`` and
# exit), or (KILL, the last resort) the shells are killed too. Prints what it signalled.
# Shell builtins only, besides the shell (and ``sleep`` where there is one).
SIGNAL = r"""
stat_of() {
  s=""; read -r s 2>/dev/null < /proc/$1/stat || return 1
  s=${s##*) }; set -f; set -- $s; set +f; state=$1; pp=$2; st=${20}
}
tree() {  # $desc: the live descendants of $roots; $parents: those of them with children
  desc=""; parents=""; changed=1
  while [ $changed = 1 ]; do
    changed=0
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      case " $roots $desc " in *" $p "*) continue;; esac
      stat_of "$p" || continue
      [ "$state" = Z ] && continue
      case " $roots $desc " in *" $pp "*) desc="$desc $p"; parents="$parents $pp"; changed=1;; esac
    done
  done
}
pause() {
  if command -v sleep >/dev/null 2>&1; then sleep 0.02; else i=0; while [ $i -lt 200 ]; do i=$((i+1)); done; fi
}
mode=$1; shift
roots=""
while [ $# -ge 2 ]; do
  if stat_of "$1" && [ "$st" = "$2" ] && [ "$state" != Z ]; then roots="$roots $1"; fi
  shift 2
done
[ -n "$roots" ] || { echo "envctl-signalled"; exit 0; }
tree
if [ "$mode" = INT ]; then kill -INT $roots $desc 2>/dev/null; echo "envctl-signalled$roots$desc"; exit 0; fi
[ "$mode" = END ] && kill -INT $roots 2>/dev/null
ended=""; round=0
while [ -n "$desc" ] && [ $round -lt 20 ]; do
  round=$((round+1)); leaves=""
  for p in $desc; do case " $parents " in *" $p "*) ;; *) leaves="$leaves $p";; esac; done
  [ $round -lt 20 ] || leaves=$desc
  kill -KILL $leaves 2>/dev/null; ended="$ended$leaves"
  n=0
  while [ $n -lt 50 ]; do
    left=""
    for p in $leaves; do
      stat_of "$p" || continue
      case " $roots " in *" $pp "*) continue;; esac
      left="$left $p"
    done
    [ -n "$left" ] || break
    n=$((n+1)); pause
  done
  tree
done
[ "$mode" = KILL ] && kill -KILL $roots 2>/dev/null
echo "envctl-signalled$roots$ended"
"""


def read_pids(path: str) -> list[tuple[int, str]]:
    """The shells a relay recorded: (pid, start time) pairs."""
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                found.append((int(parts[0]), parts[1]))
    return found


def signal_shells(api: KubeApi, pod: str, container: str, sig: str, shells: list[tuple[int, str]]) -> str:
    """``sig`` (INT, KILL) to the shells and their descendants in the container, by one exec."""
    if not shells:
        return ""
    args = [str(x) for pid, start in shells for x in (pid, start)]
    return api.exec(pod, container, ["sh", "-c", SIGNAL, "sh", sig, *args], timeout=20)


class Relay:
    def __init__(self, api: KubeApi, pod: str, container: str, pids: str) -> None:
        self.api = api
        self.pod = pod
        self.container = container
        self.pids = pids
        self.shell: tuple[int, str] | None = None
        self.ws: Any = None
        self.ending = False  # SIGTERM: end the shell (``end``), then the relay
        self._write = threading.Lock()

    def run(self) -> int:
        self.ws = self.api.exec_stream(self.pod, self.container, ["sh", "-c", START])
        head = b""
        out = sys.stdout.buffer
        err = sys.stderr.buffer
        threading.Thread(target=self._feed, daemon=True).start()
        while self.ws.is_open():
            if self.ending:
                return self.end()
            self.ws.update(timeout=1)
            data = self.ws.read_stdout() if self.ws.peek_stdout() else b""
            if self.shell is None and data:
                head += data
                if b"\n" not in head:
                    continue
                line, data = head.split(b"\n", 1)
                parts = line.decode(errors="replace").split()
                if len(parts) != 3 or parts[0] != "envctl-shell":
                    err.write(b"envctl: the shell did not start in the container: " + line[:300] + b"\n")
                    err.flush()
                    return 1
                self.shell = (int(parts[1]), parts[2])
                with open(self.pids, "a") as f:
                    f.write(f"{parts[1]} {parts[2]}\n")
            if data:
                out.write(data)
                out.flush()
            if self.ws.peek_stderr():
                err.write(self.ws.read_stderr())
                err.flush()
        if self.shell is None and head:
            err.write(head[-300:])
            err.flush()
        return 0

    def end(self) -> int:
        """The shell's descendants killed, its running cell returned (END), then the shell told
        to reap its children and exit; killed (KILL) if it has not within a few seconds."""
        self.signal("END")
        with self._write, contextlib.suppress(Exception):
            self.ws.write_stdin(b"\nwait; exit 0\n")
        deadline = time.monotonic() + 8
        with contextlib.suppress(Exception):
            while self.ws.is_open() and time.monotonic() < deadline:
                self.ws.update(timeout=0.2)
                self.ws.read_all()  # the shell's last words go nowhere: the kernel is going
        self.signal("KILL")  # a no-op for a shell that is gone (its pid and start time)
        with contextlib.suppress(Exception):
            self.ws.close()
        return 143

    def _feed(self) -> None:
        """Our stdin to the shell's, until it closes."""
        fd = sys.stdin.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with contextlib.suppress(Exception):
                    self.ws.close()
                return
            with self._write:
                try:
                    self.ws.write_stdin(chunk)
                except Exception:
                    return

    def signal(self, sig: str) -> None:
        if self.shell is not None:
            with contextlib.suppress(EnvctlError):
                signal_shells(self.api, self.pod, self.container, sig, [self.shell])


def main(argv: list[str]) -> int:
    config, context, namespace, pod, container, pids = argv
    api = KubeApi(config, context, namespace, timeout=30)
    relay = Relay(api, pod, container, pids)

    def interrupt(_sig: int, _frame: Any) -> None:
        threading.Thread(target=relay.signal, args=("INT",), daemon=True).start()

    def terminate(_sig: int, _frame: Any) -> None:
        relay.ending = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)
    try:
        return relay.run()
    except EnvctlError as exc:
        sys.stderr.write(f"envctl: {exc.message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
