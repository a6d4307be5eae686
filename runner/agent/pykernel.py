"""The Python kernel: one persistent namespace, run as a child process of the agent.

Kernel protocol (shared by every kernel the agent starts as a child process, see
``kernels.py``):

- fd 0 is /dev/null; fd 1 and 2 are pipes the agent reads as ``stream`` outputs.
- fd 3 carries requests from the agent, one JSON object per line:
  ``{"op": "execute", "code": "..."}``.
- fd 4 carries messages to the agent, one JSON object per line:
  ``{"type": "ready"}`` once, then for each execution any number of
  ``{"type": "output", "output": {...}}`` (Jupyter's ``display_data``, ``execute_result``,
  ``error`` shapes) and one ``{"type": "done", "status": "ok"|"error"|"interrupted",
  "execution_count": N}``. Before each message on fd 4 the kernel flushes stdout and stderr,
  so the agent sees a cell's prints before its results.
- SIGINT interrupts the running cell (KeyboardInterrupt); the namespace stays.

Standard library only. matplotlib figures become ``image/png`` when matplotlib is installed.
Cells may use IPython's ``!cmd`` and the magics ``%pip``, ``%cd``, ``%env`` and
``%matplotlib inline`` (see ``magics.py``); a cell with another magic ends in an
``UnsupportedMagic`` error that names the ``jupyter`` runtime type.
"""

from __future__ import annotations

import ast
import base64
import builtins
import json
import linecache
import os
import signal
import sys
import traceback

if __name__ == "__main__":  # run as a script by the agent
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import magics

    # Gone again, so that a user's own `import magics` finds their module, not the agent's.
    del sys.path[0], sys.modules["magics"]
else:  # imported as runner.agent.pykernel (tests, tools)
    from runner.agent import magics

CONTROL_IN, CONTROL_OUT = 3, 4


class Kernel:
    def __init__(self) -> None:
        self.out = os.fdopen(CONTROL_OUT, "w", buffering=1, encoding="utf-8")
        self.count = 0
        self._held: list[str] | None = None
        self.namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        self._install_display()
        setattr(builtins, magics.HELPER, magics.Magics(self.namespace))

    # --- messages ---------------------------------------------------------------------
    def send(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":"), default=str) + "\n"
        if self._held is not None:
            self._held.append(line)  # the cell's code is done: its last messages go together
            return
        self._write(line)

    def _write(self, text: str) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self.out.write(text)
        self.out.flush()

    def _hold(self) -> None:
        """From here to ``done`` nothing of the user's code runs: the result, figures and the
        end are written at once, one wake-up of the agent instead of several."""
        if self._held is None:
            self._held = []

    def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._write("".join(held))

    def output(self, output: dict) -> None:
        self.send({"type": "output", "output": output})

    # --- rich display -----------------------------------------------------------------
    def _install_display(self) -> None:
        kernel = self

        def display(*objs: object, raw: bool = False) -> None:
            """Show objects as rich output: display(obj), display(HTML("<b>x</b>"))."""
            for obj in objs:
                data = obj if raw and isinstance(obj, dict) else mime_bundle(obj)
                kernel.output({"output_type": "display_data", "data": data, "metadata": {}})

        for name, value in (
            ("display", display),
            ("HTML", HTML),
            ("Markdown", Markdown),
            ("JSON", JSON),
            ("Image", Image),
            ("SVG", SVG),
        ):
            setattr(builtins, name, value)

    def flush_figures(self) -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        try:
            import io

            for num in pyplot.get_fignums():
                fig = pyplot.figure(num)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", bbox_inches="tight")
                self.output(
                    {
                        "output_type": "display_data",
                        "data": {
                            "image/png": base64.b64encode(buf.getvalue()).decode(),
                            "text/plain": repr(fig),
                        },
                        "metadata": {},
                    }
                )
            pyplot.close("all")
        except Exception as exc:  # a broken figure must not lose the cell's status
            self.output(error_output(exc, "<figures>"))

    # --- execution --------------------------------------------------------------------
    def execute(self, code: str) -> None:
        self.count += 1
        filename = f"<cell {self.count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        status = "ok"
        try:
            tree = parse(code, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                expr = tree.body.pop()
                assert isinstance(expr, ast.Expr)
                last = ast.Expression(expr.value)
            exec(compile(tree, filename, "exec"), self.namespace)  # noqa: S102  (running cells is the point)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.namespace)  # noqa: S307
                self._hold()
                if value is not None:
                    self.namespace["_"] = value
                    self.output(
                        {
                            "output_type": "execute_result",
                            "execution_count": self.count,
                            "data": mime_bundle(value),
                            "metadata": {},
                        }
                    )
        except KeyboardInterrupt as exc:
            status = "interrupted"
            self.output(error_output(exc, filename))
        except magics.UnsupportedMagic as exc:
            status = "error"
            self.output(exc.output(filename))
        except SystemExit as exc:
            status = "error"
            self.output(
                {
                    "output_type": "error",
                    "ename": "SystemExit",
                    "evalue": str(exc.code),
                    "traceback": [f"SystemExit: {exc.code}"],
                }
            )
        except BaseException as exc:
            status = "error"
            self.output(error_output(exc, filename))
        self._hold()
        try:
            self.flush_figures()
            self.send({"type": "done", "status": status, "execution_count": self.count})
        finally:
            self._release()

    def serve(self) -> None:
        requests = os.fdopen(CONTROL_IN, "r", encoding="utf-8")
        self.send({"type": "ready", "language": "python", "version": sys.version.split()[0]})
        while True:
            try:
                line = requests.readline()
            except KeyboardInterrupt:
                continue  # an interrupt between cells changes nothing
            if not line:
                return  # the agent went away
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if request.get("op") == "environ":  # variables handed over after the start (not a cell)
                os.environ.update({str(k): str(v) for k, v in dict(request.get("env") or {}).items()})
                continue
            if request.get("op") == "execute":
                try:
                    self.execute(str(request.get("code", "")))
                except KeyboardInterrupt:
                    # arrived after the cell finished but before "done" was sent
                    self.send({"type": "done", "status": "interrupted", "execution_count": self.count})


def parse(code: str, filename: str) -> ast.Module:
    """The cell's syntax tree; IPython's shell escapes and magics are rewritten as calls when
    the cell is not plain Python (a cell that compiles never holds one, see ``magics.py``)."""
    try:
        return ast.parse(code, filename=filename, mode="exec")
    except SyntaxError:
        rewritten = magics.transform(code)
        if rewritten is None:
            raise
    return ast.parse(rewritten, filename=filename, mode="exec")


def error_output(exc: BaseException, filename: str) -> dict:
    """Jupyter's error shape, with the kernel's own frames left out of the traceback (and
    those of the magics' helpers: an error in ``%cd`` points at the cell's ``%cd`` line)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        tb = None  # the cell itself does not compile: the compiler's own frames say nothing
    report = traceback.TracebackException(type(exc), exc, tb)
    report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != magics.__file__])
    lines = list(report.format())
    return {
        "output_type": "error",
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "traceback": [line.rstrip("\n") for line in lines],
    }


# --- rich display objects ----------------------------------------------------------------


class _Rich:
    mime = "text/plain"

    def __init__(self, data: object) -> None:
        self.data = data

    def _bundle(self) -> dict:
        return {self.mime: self.data, "text/plain": f"<{type(self).__name__} object>"}


class HTML(_Rich):
    mime = "text/html"


class Markdown(_Rich):
    mime = "text/markdown"


class SVG(_Rich):
    mime = "image/svg+xml"


class JSON(_Rich):
    mime = "application/json"

    def _bundle(self) -> dict:
        return {"application/json": self.data, "text/plain": json.dumps(self.data, default=str)[:1000]}


class Image(_Rich):
    """An image from bytes or a file path; PNG unless ``format="jpeg"``."""

    def __init__(self, data: bytes | str, format: str = "png") -> None:  # noqa: A002
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
            if data[:3] == b"\xff\xd8\xff":
                format = "jpeg"
        super().__init__(data)
        self.mime = f"image/{format}"

    def _bundle(self) -> dict:
        assert isinstance(self.data, bytes)
        return {self.mime: base64.b64encode(self.data).decode(), "text/plain": f"<Image {self.mime}>"}


def mime_bundle(value: object) -> dict:
    """A MIME bundle for a value: text/plain always, plus what its _repr_*_ methods give."""
    if isinstance(value, _Rich):
        return value._bundle()
    data: dict = {}
    for method, mime, binary in (
        ("_repr_html_", "text/html", False),
        ("_repr_markdown_", "text/markdown", False),
        ("_repr_svg_", "image/svg+xml", False),
        ("_repr_png_", "image/png", True),
        ("_repr_jpeg_", "image/jpeg", True),
        ("_repr_json_", "application/json", False),
    ):
        fn = getattr(value, method, None)
        if fn is None or isinstance(value, type):
            continue
        try:
            result = fn()
        except Exception:  # noqa: S112  (a broken _repr_ must not break the cell)
            continue
        if isinstance(result, tuple):
            result = result[0]
        if result is None:
            continue
        if binary and isinstance(result, bytes):
            result = base64.b64encode(result).decode()
        data[mime] = result
    fig = _figure_png(value)
    if fig is not None:
        data["image/png"] = fig
    try:
        data["text/plain"] = repr(value)
    except Exception as exc:
        data["text/plain"] = f"<unrepresentable {type(value).__name__}: {exc}>"
    return data


def _figure_png(value: object) -> str | None:
    cls = type(value)
    if cls.__name__ != "Figure" or not cls.__module__.startswith("matplotlib"):
        return None
    import io

    buf = io.BytesIO()
    value.savefig(buf, format="png", bbox_inches="tight")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [""]
    sys.path[0] = ""  # the working directory, as in an interactive interpreter; not the agent's code
    Kernel().serve()


if __name__ == "__main__":
    main()
