"""The API's settings, and the whole server's: the runner's settings (runner/settings.py, which
extend the registry's and the core's) plus what only the API uses. ``load`` reads them all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envs.kit.config import load_settings, parse_bool, setting, settings_help
from runner import settings as runner_settings

#: variables only the CLI reads (api/cli/client.py); the server's come from the Settings fields
CLI_HELP: tuple[tuple[str, str], ...] = (
    ("ENVCTL_CONFIG", "YAML config file (same keys as the settings, sections as nested maps)"),
    ("ENVCTL_URL", "the API the CLI talks to (default http://127.0.0.1:8700)"),
    ("ENVCTL_TOKEN", "bearer token the CLI sends (default: the one `envctl serve` wrote)"),
)


@dataclass(frozen=True)
class Settings(runner_settings.Settings):
    # FastAPI's OpenTelemetry spans, metrics and logs (sent to the OTLP endpoint that the
    # OTEL_* variables name). Off by default: they cost about a millisecond per request.
    api_telemetry: bool = setting(
        False,
        env="ENVCTL_API_TELEMETRY",
        parse=parse_bool,
        help="FastAPI's OpenTelemetry spans, metrics and logs, sent where the OTEL_* variables say"
        " (default false: they cost about 1 ms per request)",
    )

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"


def load(config_file: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """All the server's settings from defaults, a YAML file and the environment."""
    return load_settings(Settings, config_file, env)


def help_lines() -> list[tuple[str, str]]:
    """Every variable envctl reads, with its help: the CLI's first, then the server's."""
    return [*CLI_HELP, *settings_help(Settings)]
