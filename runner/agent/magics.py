"""IPython's shell escapes and a few of its magics, for the native Python kernel.

Jupyter notebooks are written for IPython, whose cells may hold lines that are not Python:

    !ls -l                  a shell command; its output streams as the cell's stdout/stderr
    files = !ls             the same, its stdout captured as a list of lines (``!!ls``: as a value)
    %pip install requests   ``python -m pip ...`` with the kernel's own interpreter
    %cd /data               the kernel's working directory (``%cd`` alone: home; ``%cd -``: back)
    %env                    the environment (``%env NAME``, ``%env NAME=value``, ``%env NAME value``)
    %matplotlib inline      accepted: figures already become PNG images

``transform(code)`` rewrites each such line into one call of the ``Magics`` object that the
kernel puts into builtins as ``__envctl_magics__``, on the same physical line and with the same
indentation, so the rest of the cell runs as ordinary Python and tracebacks keep their line
numbers. Any other magic (``%timeit``, ``%%bash``, ...) raises ``UnsupportedMagic`` before
anything of the cell runs, naming the magic and the ``jupyter`` runtime type, which runs the
environment's own IPython kernel.

How lines are found: only where a logical line starts, as IPython does (indented lines inside
blocks included). The tokenize module walks the cell one logical line at a time, so a ``!`` or
``%`` inside a string, a multi-line string literal, brackets or a backslash continuation is
never taken for a magic. No line that starts with ``!`` or ``%`` (or ``name = !``/``name = %``)
is valid Python, so a cell that compiles is never rewritten: the kernel only calls
``transform`` after the compiler refused the cell.

Shell commands go to ``/bin/sh -c CMD`` as one argument, exactly as typed. IPython's expansion
of ``{expr}`` and ``$name`` from Python variables is not done (``$NAME`` still reaches the shell,
which expands environment variables); ``%pip`` splits its arguments with ``shlex`` and runs pip
without a shell.

Standard library only: this runs inside every environment, on its own python3.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize

try:  # noqa: SIM105  (annotations only)
    from typing import Any
except ImportError:  # pragma: no cover
    pass

#: the name under which the kernel puts a ``Magics`` into builtins
HELPER = "__envctl_magics__"

#: line magics this kernel runs itself; any other one needs IPython
SUPPORTED = ("pip", "cd", "env", "matplotlib")
#: ``%matplotlib`` arguments that mean what this kernel does anyway
INLINE_BACKENDS = ("", "inline", "agg")
#: ``%env`` alone shows these variables' values as <hidden>, as IPython does
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASS", "CREDENTIAL")

# Only ever matched against the text of ONE logical line that starts where it starts (found by
# tokenize): ``target = !cmd`` or ``target = %magic args``.
_ASSIGNED = re.compile(r"([^\W\d][\w.]*(?:[ \t]*,[ \t]*[^\W\d][\w.]*)*)[ \t]*=[ \t]*([!%].*)", re.DOTALL)


class UnsupportedMagic(Exception):  # noqa: N818  (the name users see, as IPython's UsageError)
    """A magic this kernel does not run; ``output()`` is the cell's error, as Jupyter shows it."""

    def __init__(self, magic: str, lineno: int, line: str, message: str = "") -> None:
        self.magic = magic
        self.lineno = lineno
        self.line = line
        self.message = message or (
            f"{magic} needs IPython; run this notebook with the jupyter runtime type "
            "(envctl run --type jupyter) in an environment with ipykernel, such as python3-jupyter"
        )
        super().__init__(self.message)

    def output(self, filename: str) -> dict[str, Any]:
        return {
            "output_type": "error",
            "ename": "UnsupportedMagic",
            "evalue": self.message,
            "traceback": [
                f'  File "{filename}", line {self.lineno}',
                f"    {self.line.strip()}",
                f"UnsupportedMagic: {self.message}",
            ],
        }


class UsageError(Exception):
    """A supported magic used wrongly (IPython's name for it)."""


# --- the transformation -------------------------------------------------------------------


def transform(code: str) -> str | None:
    """The cell with its magic lines rewritten as calls, or None when it has none.

    Every line keeps its number: a magic continued with a trailing backslash becomes its call
    followed by empty lines. Raises ``UnsupportedMagic`` for a magic this kernel cannot run.
    """
    lines = io.StringIO(code, newline="").readlines()  # \n, \r\n and \r only, as the compiler
    out = list(lines)
    changed = False
    i = 0
    while i < len(lines):
        text = lines[i]
        body = text.lstrip(" \t\f")
        if not body.strip() or body.startswith("#"):
            i += 1
            continue
        end = i
        while _continued(lines[end]) and end + 1 < len(lines):
            end += 1
        call = _rewrite(text[: len(text) - len(body)], _joined(lines[i : end + 1])[len(text) - len(body) :], i + 1)
        if call is not None:
            out[i] = call + _newline(lines[end])
            for k in range(i + 1, end + 1):
                out[k] = _newline(lines[k])
            changed = True
            i = end + 1
            continue
        span = _logical_line_length(lines, i)
        if span is None:
            break  # the tokenizer gave up here: the compiler will say what is wrong
        i += span
    return "".join(out) if changed else None


def _continued(line: str) -> bool:
    return line.rstrip("\r\n").endswith("\\") and line.endswith(("\n", "\r"))


def _joined(lines: list[str]) -> str:
    """Physical lines joined where a backslash continued them; no trailing newline."""
    parts = [line.rstrip("\r\n") for line in lines]
    return "".join(p[:-1] if k < len(parts) - 1 else p for k, p in enumerate(parts))


def _newline(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def _rewrite(indent: str, body: str, lineno: int) -> str | None:
    """The Python line for a logical line ``body`` (indentation removed) that is a magic."""
    if body.startswith("%%"):
        name = body[2:].split(None, 1)[0] if body[2:].strip() else ""
        raise UnsupportedMagic(f"%%{name}", lineno, body)
    if body.startswith("!!"):
        return f"{indent}{HELPER}.getoutput({body[2:]!r})"
    if body.startswith("!"):
        return f"{indent}{HELPER}.system({body[1:]!r})"
    if body.startswith("%"):
        return indent + _line_magic(body, lineno)
    assigned = _ASSIGNED.fullmatch(body)
    if assigned is None:
        return None
    target, value = assigned.group(1), assigned.group(2)
    if value.startswith("!"):
        return f"{indent}{target} = {HELPER}.getoutput({value[1:]!r})"
    if value.startswith("%%"):
        return None  # not a magic: the compiler reports the syntax error
    return f"{indent}{target} = {_line_magic(value, lineno)}"


def _line_magic(text: str, lineno: int) -> str:
    """The call for ``%name args``; ``UnsupportedMagic`` for a magic this kernel cannot run."""
    name, _, rest = text[1:].partition(" ")
    if "\t" in name:
        name, _, more = name.partition("\t")
        rest = more + " " + rest if rest else more
    if name not in SUPPORTED:
        raise UnsupportedMagic(f"%{name}", lineno, text)
    backend = rest.split("#", 1)[0].strip()  # `%matplotlib inline  # for plots` is common
    if name == "matplotlib" and backend.lower() not in INLINE_BACKENDS:
        raise UnsupportedMagic(
            f"%matplotlib {backend}",
            lineno,
            text,
            f"%matplotlib {backend}: the native Python runtime shows figures inline only (as PNG "
            "images); use %matplotlib inline",
        )
    return f"{HELPER}.line({name!r}, {rest.strip()!r})"


def _logical_line_length(lines: list[str], start: int) -> int | None:
    """How many physical lines the Python logical line at ``start`` spans, per tokenize.

    None when the tokenizer cannot tell (an unterminated string or bracket): scanning stops
    there and the compiler reports the error.
    """
    position = start

    def readline() -> str:
        nonlocal position
        if position >= len(lines):
            return ""
        position += 1
        return lines[position - 1]

    try:
        for token in tokenize.generate_tokens(readline):
            if token.type == tokenize.NEWLINE:
                return max(1, token.start[0])
            if token.type == tokenize.ENDMARKER:
                return max(1, position - start)
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return None
    return None


# --- running them -------------------------------------------------------------------------


class Magics:
    """What the rewritten lines call, in the kernel's process (its cwd, its environment).

    ``namespace`` is the cells' namespace: ``_exit_code`` is set there after a shell command,
    as IPython does. A non-zero exit status of ``!cmd`` is not an error (as in IPython); a
    failing ``%pip`` is, so that a notebook run stops where an install failed.
    """

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self._previous_dir: str | None = None

    # shell escapes
    def system(self, command: str) -> None:
        """``!cmd``: run by /bin/sh in the kernel's working directory, output streamed."""
        _flush()
        done = subprocess.run(["/bin/sh", "-c", command], check=False)
        self.namespace["_exit_code"] = done.returncode

    def getoutput(self, command: str) -> list[str]:
        """``x = !cmd``: the command's stdout as a list of lines; its stderr is streamed."""
        _flush()
        done = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE, check=False)
        self.namespace["_exit_code"] = done.returncode
        return done.stdout.decode("utf-8", "replace").splitlines()

    # line magics
    def line(self, name: str, rest: str) -> Any:
        if name == "pip":
            return self.pip(rest)
        if name == "cd":
            return self.cd(rest)
        if name == "env":
            return self.env(rest)
        if name == "matplotlib":
            return self.matplotlib(rest)
        raise UsageError(f"%{name} is not a magic of this kernel")

    def pip(self, rest: str) -> None:
        try:
            args = shlex.split(rest)
        except ValueError as exc:
            raise UsageError(f"%pip {rest}: {exc}") from None
        if not args:
            raise UsageError("%pip needs a pip command, e.g. %pip install requests")
        _flush()
        done = subprocess.run([sys.executable, "-m", "pip", *args], check=False)
        importlib.invalidate_caches()  # what was just installed can be imported in this kernel
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, f"pip {rest}")

    def cd(self, rest: str) -> None:
        arg = _unquote(rest.strip())
        if arg == "-":
            if self._previous_dir is None:
                raise UsageError("%cd -: there is no previous directory")
            target = self._previous_dir
        else:
            target = os.path.expanduser(arg or "~")
        here = os.getcwd()
        os.chdir(target)
        self._previous_dir = here
        now = os.getcwd()
        os.environ["OLDPWD"] = here
        os.environ["PWD"] = now
        print(now)

    def env(self, rest: str) -> Any:
        arg = rest.strip()
        if not arg:
            return {k: "<hidden>" if any(w in k.upper() for w in SECRET_WORDS) else v for k, v in os.environ.items()}
        if "=" in arg:
            name, value = arg.split("=", 1)
        elif " " in arg or "\t" in arg:
            name, value = arg.split(None, 1)
        else:
            if arg not in os.environ:
                raise UsageError(f"the environment has no variable {arg}")
            return os.environ[arg]
        name, value = name.strip(), value.strip()
        if not name or "\0" in name or "\0" in value:
            raise UsageError(f"%env {arg}: not a variable name and value")
        os.environ[name] = value
        print(f"env: {name}={value}")
        return None

    def matplotlib(self, rest: str) -> None:
        """Figures are PNGs after each cell already; make sure the backend draws off-screen."""
        os.environ["MPLBACKEND"] = "Agg"
        matplotlib = sys.modules.get("matplotlib")
        if matplotlib is not None and str(matplotlib.get_backend()).lower() != "agg":
            matplotlib.use("Agg")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
