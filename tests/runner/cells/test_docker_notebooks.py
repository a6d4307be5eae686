"""Notebooks as Jupyter users write them, on real runtimes: which kernelspecs an environment
provides (read from its image without running it), and IPython's magics in the native type."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from envs.kit.errors import BackendError
from runner.backends.base import LABEL_MANAGED
from runner.backends.docker import DockerBackend
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def notebook_server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `envctl serve` with python3 and python3-jupyter registered."""
    base_image(docker, "python3")
    base_image(docker, "python3-jupyter")
    srv = start_server(docker, tmp_path_factory.mktemp("notebooks") / "data", ["python3", "python3-jupyter"])
    yield srv
    remove_runner_containers(docker, srv)


def kernelspec_holders(docker: Any) -> list[Any]:
    filters = {"label": [f"{TEST_LABEL}={TEST_SESSION}", f"{LABEL_MANAGED}=kernelspecs"]}
    return list(docker.containers.list(all=True, filters=filters))


def test_the_docker_backend_reads_an_images_kernelspecs_and_leaves_no_container(docker: Any) -> None:
    backend = DockerBackend(labels={TEST_LABEL: TEST_SESSION})
    try:
        jupyter = base_image(docker, "python3-jupyter")
        specs = backend.kernelspecs(jupyter)
        assert {"name": "python3", "language": "python", "path": "/usr/share/jupyter/kernels/python3"}.items() <= (
            next(k for k in specs if k["name"] == "python3").items()
        ), specs
        assert next(k for k in specs if k["name"] == "python3")["display_name"].startswith("Python 3")
        assert backend.kernelspecs(base_image(docker, "python3")) == []
        with pytest.raises(BackendError, match="not in the Docker engine"):
            backend.kernelspecs("sha256:" + "0" * 64)
        assert kernelspec_holders(docker) == []
    finally:
        backend.close()
    # an image id names immutable content: the answer is kept, even with no engine to ask
    offline = DockerBackend(base_url="unix:///nonexistent/docker.sock", timeout=2)
    assert offline.kernelspecs(jupyter) == specs


def _kernel_image(docker: Any) -> str:
    """An image of kernel.json files only (never started, so it needs no programs): good ones,
    and every kind the reader must leave out."""

    def spec(name: str) -> bytes:
        return json.dumps({"argv": ["python3", "-m", "x"], "display_name": name.upper(), "language": "lang"}).encode()

    files: dict[str, bytes] = {
        "root/.local/share/jupyter/kernels/shadowed/kernel.json": spec("user's"),
        "usr/share/jupyter/kernels/shadowed/kernel.json": spec("system's"),
        "opt/k/linked/kernel.json": spec("linked"),  # /usr/local/share/jupyter/kernels -> /opt/k
        "usr/share/jupyter/kernels/Upper.Case/kernel.json": spec("upper"),
        "usr/share/jupyter/kernels/huge/kernel.json": b" " * (64 * 1024 + 1) + spec("huge"),
        "usr/share/jupyter/kernels/broken/kernel.json": b"{not json",
        "usr/share/jupyter/kernels/no-argv/kernel.json": json.dumps({"display_name": "x"}).encode(),
        "usr/share/jupyter/kernels/bad name/kernel.json": spec("bad"),
        "usr/share/jupyter/kernels/nested/deeper/kernel.json": spec("nested"),
    }
    files.update({f"usr/share/jupyter/kernels/k{n:03}/kernel.json": spec(f"k{n}") for n in range(120)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/local/share/jupyter/kernels")
        link.type, link.linkname = tarfile.SYMTYPE, "/opt/k"
        tar.addfile(link)
        target = tarfile.TarInfo("usr/share/jupyter/kernels/symlinked/kernel.json")
        target.type, target.linkname = tarfile.SYMTYPE, "/opt/k/linked/kernel.json"
        tar.addfile(target)
    answer = docker.api.import_image_from_data(
        buffer.getvalue(),
        repository="envctl-test/kernels",
        tag=TEST_SESSION,
        changes=[f"LABEL {TEST_LABEL}={TEST_SESSION}"],
    )
    return str(docker.images.get(f"envctl-test/kernels:{TEST_SESSION}").id) if answer else ""


def test_kernelspecs_are_read_in_jupyters_order_within_limits_and_odd_ones_left_out(docker: Any) -> None:
    image = _kernel_image(docker)
    backend = DockerBackend(labels={TEST_LABEL: TEST_SESSION})
    try:
        specs = {k["name"]: k for k in backend.kernelspecs(image)}
    finally:
        backend.close()
        docker.images.remove(image, force=True)
    assert specs["shadowed"]["display_name"] == "USER'S"  # the user's directory comes first, as in Jupyter
    assert specs["shadowed"]["path"] == "/root/.local/share/jupyter/kernels/shadowed"
    assert specs["linked"]["path"] == "/usr/local/share/jupyter/kernels/linked"  # a symlinked directory is read
    assert specs["upper.case"]["language"] == "lang"  # names are lower case, as Jupyter has them
    assert not {"huge", "broken", "no-argv", "bad name", "nested", "deeper", "symlinked"} & set(specs)
    assert len(specs) == 100  # at most 100; the rest are left out
    assert kernelspec_holders(docker) == []


def test_the_kernelspecs_endpoint_lists_python3_for_python3_jupyter_and_none_for_python3(
    notebook_server: Server, docker: Any
) -> None:
    with notebook_server.client() as client:
        r = client.get("/environments/python3-jupyter/kernelspecs")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ref"].startswith("python3-jupyter@")
        assert "python3" in [k["name"] for k in body["kernelspecs"]]
        r = client.get("/environments/python3/kernelspecs")
        assert r.status_code == 200, r.text
        assert r.json()["kernelspecs"] == []
        assert client.get("/environments/python3@99/kernelspecs").status_code == 404
    assert kernelspec_holders(docker) == []


def test_a_cell_with_a_shell_command_and_matplotlib_inline_runs_in_a_native_python3_runtime(
    notebook_server: Server,
) -> None:
    with notebook_server.client() as client:
        rid = new_runtime(client, name="magics")
        ex = run(client, rid, "%matplotlib inline\n!echo hi\n%cd /tmp\n!pwd\nfiles = !ls /\n'usr' in files")
        assert ex["status"] == "ok", ex
        assert text(ex) == "hi\n/tmp\n/tmp\n"
        [result] = [o for o in ex["outputs"] if o["output_type"] == "execute_result"]
        assert result["data"]["text/plain"] == "True"
        ex = run(client, rid, "%pip --version")
        assert ex["status"] == "ok" and text(ex).startswith("pip "), ex
        ex = run(client, rid, "%timeit 1 + 1")
        assert ex["status"] == "error" and ex["error_name"] == "UnsupportedMagic"
        [err] = [o for o in ex["outputs"] if o["output_type"] == "error"]
        assert "jupyter runtime type" in err["evalue"]


def _notebook_with_magics(path: Any, environment: str) -> Any:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata.update(
        {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "envctl": {"environment": environment},
        }
    )
    # %matplotlib inline only where the native type runs it: IPython's needs matplotlib, which
    # python3-jupyter does not have (the cell would fail in Jupyter too)
    first = "%matplotlib inline\n" if environment == "python3" else "%env GREETING=hi\n"
    nb.cells = [
        nbformat.v4.new_code_cell(first + "import sys\nprint(sys.version_info[0])"),
        nbformat.v4.new_code_cell("!echo hi from the shell"),
        nbformat.v4.new_code_cell("%timeit -n 1 -r 1 sum(range(10))"),
    ]
    nbformat.write(nb, str(path))
    return path


def _envctl(srv: Server, *args: str) -> Any:
    import os
    import subprocess
    import sys

    token = (srv.data_dir / "admin-token").read_text().strip()
    env = {**os.environ, "ENVCTL_URL": srv.url, "ENVCTL_TOKEN": token}
    command = [sys.executable, "-m", "api.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_a_notebook_with_magics_runs_with_the_jupyter_type_where_the_environment_has_its_kernelspec(
    notebook_server: Server, tmp_path: Any
) -> None:
    import nbformat

    src = _notebook_with_magics(tmp_path / "magics.ipynb", "python3-jupyter")
    done = _envctl(notebook_server, "run", str(src), "--json")
    assert done.returncode == 0, done.stdout
    summary = json.loads(done.stdout)
    assert summary["runtime"]["type"] == "jupyter" and summary["runtime"]["kernel"] == "python3"
    assert [c["status"] for c in summary["cells"]] == ["ok", "ok", "ok"]
    nb = nbformat.read(str(src), as_version=4)
    # IPython runs ! commands on a pseudo-terminal: its lines end in \r\n
    assert "".join(o.get("text", "") for o in nb.cells[1].outputs).strip() == "hi from the shell"
    assert "per loop" in "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "Traceback" not in done.stderr


def test_the_same_notebook_on_python3_runs_natively_and_names_the_jupyter_type_for_timeit(
    notebook_server: Server, tmp_path: Any
) -> None:
    import nbformat

    src = _notebook_with_magics(tmp_path / "magics.ipynb", "python3")
    done = _envctl(notebook_server, "run", str(src))
    assert done.returncode == 1, done.stderr  # the %timeit cell fails, saying what to do
    assert "runtime type: native (python3@1 has no Jupyter kernelspec python3" in done.stderr
    nb = nbformat.read(str(src), as_version=4)
    assert "".join(o.get("text", "") for o in nb.cells[1].outputs) == "hi from the shell\n"
    [error] = nb.cells[2].outputs
    assert error.ename == "UnsupportedMagic" and "jupyter" in error.evalue
    assert "SyntaxError" not in done.stderr
