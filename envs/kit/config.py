"""Settings: typed objects, read from an optional YAML file and ``ENVCTL_*`` variables.

Each package owns its settings: this module holds the machinery and the core ``Settings``
that every package shares (where the data and the database are, where the API listens, how
base images are built); ``registry/settings.py``, ``runner/settings.py`` and
``api/settings.py`` each extend the class below them with their own fields. A field is
declared with :func:`setting`, which records its variable, its parser and its help text, so
that :func:`load_settings` and :func:`settings_help` work on any of these classes.

Precedence, highest first: environment variables, the config file (``--config FILE`` or
``ENVCTL_CONFIG``), built-in defaults. Every setting has a variable named
``ENVCTL_<SECTION>_<NAME>`` (top-level ones drop the section: ``ENVCTL_DATA_DIR``).

The README's "Configuration" table lists them; tests/test_settings_ownership.py keeps it in
step with :func:`settings_help` of the full (``api.settings``) class.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

from envs.kit.errors import InvalidInputError

#: Debian's folder for locally added CAs on the build machine (update-ca-certificates reads it).
DEFAULT_EXTRA_CA_CERTS = Path("/usr/local/share/ca-certificates")

#: sections of the config file whose keys are flattened into ``<section>_<key>``
SECTIONS = frozenset({"api", "runner", "base", "results", "registry"})


def setting(
    default: Any = MISSING,
    *,
    env: str | None,
    help: str,  # noqa: A002 - the word the brief and argparse use
    parse: Callable[..., Any] = str,
    default_factory: Callable[[], Any] | Any = MISSING,
    located: bool = False,
) -> Any:
    """A settings field: its default, the variable that sets it (``None``: only the config file
    does), the parser its text or YAML value goes through (a ``ValueError``/``TypeError`` it
    raises becomes an error naming the variable or key), and its help line. ``located``: the
    parser is called as ``parse(value, where)`` and raises ``InvalidInputError`` itself."""
    metadata = {"env": env, "parse": parse, "help": help, "located": located}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------ generic parsers


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not true or false")


def parse_path(v: Any) -> Path:
    return Path(str(v)).expanduser()


def parse_paths(v: Any) -> tuple[Path, ...]:
    """A YAML list of paths, or one string of paths separated by ``:`` or ``,``."""
    if v is None:
        return ()
    if isinstance(v, dict):
        raise ValueError("expected a list of paths")
    items = v if isinstance(v, list | tuple) else re.split(r"[:,]", str(v))
    return tuple(parse_path(str(item).strip()) for item in items if str(item).strip())


def parse_names(v: Any) -> tuple[str, ...]:
    """A YAML list of names, or one string of them separated by ``,`` (lower-cased)."""
    items = v if isinstance(v, list | tuple) else str(v or "").split(",")
    return tuple(str(i).strip().lower() for i in items if str(i).strip())


def parse_labels(v: Any) -> dict[str, str]:
    """A YAML map, or ``k=v,k2=v2``."""
    if isinstance(v, dict):
        return {str(k): str(val) for k, val in v.items()}
    out: dict[str, str] = {}
    for item in str(v).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def parse_memory(value: Any, where: str) -> int:
    """Bytes, or a size like ``2g``, ``512m``, ``3GiB``; refused naming ``where``."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    try:
        if text[-1:] == "b":
            text = text[:-1]
        if text[-1:] == "i":
            text = text[:-1]
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError as exc:
        raise InvalidInputError(
            f"{where}: memory must be bytes or a size like 2g or 512m, not {value!r}", field=where
        ) from exc


def parse_percent_below_100(value: Any) -> float:
    """A percentage from 0 (off) up to, not including, 100 (``90``, ``92.5``)."""
    number = float(str(value).strip().removesuffix("%"))
    if not 0 <= number < 100:
        raise ValueError("a percentage from 0 (off) to below 100 is expected")
    return number


# ------------------------------------------------------------------------------ the core settings


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "envctl"


@dataclass(frozen=True)
class Settings:
    """What every package shares: where the data and the database are, where the API listens
    (the registry derives its token realm from it), and how base images are built."""

    data_dir: Path = setting(
        env="ENVCTL_DATA_DIR",
        parse=parse_path,
        default_factory=_default_data_dir,
        help="where envctl keeps its database, runtime state and results",
    )
    database_url: str | None = setting(
        None, env="ENVCTL_DATABASE_URL", help="SQLAlchemy URL; default sqlite:///<data dir>/envctl.db"
    )
    api_host: str = setting(
        "127.0.0.1", env="ENVCTL_API_HOST", help="address `envctl serve` listens on (default 127.0.0.1)"
    )
    api_port: int = setting(
        8700, env="ENVCTL_API_PORT", parse=int, help="port `envctl serve` listens on (default 8700)"
    )
    base_mirror: str | None = setting(
        None, env="ENVCTL_BASE_MIRROR", help="Debian mirror for base images (default: the machine's apt mirror)"
    )
    # PEM CA certificates (files, or folders of *.crt) added to the root base image, e.g. a
    # TLS-intercepting proxy's. The default folder may be missing; a named path may not.
    base_extra_ca_certs: tuple[Path, ...] = setting(
        (DEFAULT_EXTRA_CA_CERTS,),
        env="ENVCTL_BASE_EXTRA_CA_CERTS",
        parse=parse_paths,
        help="CA files or folders of *.crt trusted inside base images, : or , separated"
        " (default /usr/local/share/ca-certificates)",
    )

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'envctl.db'}"

    def with_overrides(self, **changes: Any) -> Self:
        return replace(self, **changes)


# ------------------------------------------------------------------------------ loading

S = TypeVar("S", bound=Settings)


def settings_help(cls: type[Settings]) -> list[tuple[str, str]]:
    """``(variable, help)`` of every setting of ``cls`` that a variable sets, in field order."""
    return [(f.metadata["env"], f.metadata["help"]) for f in dataclasses.fields(cls) if f.metadata.get("env")]


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"runner": {"idle_timeout": 5}}`` -> ``{"runner_idle_timeout": 5}``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in SECTIONS:
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    return flat


def _read_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(path).expanduser()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise InvalidInputError(f"{p}: cannot read config file: {exc.strerror}", field="config") from exc
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{p}: not valid YAML: {exc}", field="config") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{p}: the config file must be a YAML map", field="config")
    return p, _flatten(raw)


def _convert(f: dataclasses.Field[Any], value: Any, where: str, source: str) -> Any:
    parse = f.metadata["parse"]
    if f.metadata.get("located"):
        return parse(value, source)
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: {value!r} is not a valid value ({exc})", field=f.name) from exc


def load_settings(
    cls: type[S],
    config_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    *,
    partial: bool = False,
) -> S:
    """Build ``cls`` from its defaults, a YAML file and the environment. A key of the file
    that ``cls`` does not know is refused, naming the known ones, unless ``partial``: a lower
    package reading only its own settings leaves the others to the packages above it."""
    env = dict(os.environ if env is None else env)
    fields = {f.name: f for f in dataclasses.fields(cls) if "parse" in f.metadata}
    values: dict[str, Any] = {}
    path = config_file or env.get("ENVCTL_CONFIG")
    if path:
        p, flat = _read_file(path)
        for key, value in flat.items():
            if key in fields:
                values[key] = _convert(fields[key], value, f"{p}: {key}", str(p))
            elif not partial:
                known = ", ".join(sorted(fields))
                raise InvalidInputError(f"{p}: unknown setting {key!r}; known settings: {known}", field=key)
    for key, f in fields.items():
        var = f.metadata["env"]
        if var and env.get(var):
            values[key] = _convert(f, env[var], var, var)
    return cls(**values)
