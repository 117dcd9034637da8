"""Typed configuration: pydantic models loaded from YAML and overridden from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base class for every subsystem's config: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def short_validation_message(exc: ValidationError) -> str:
    """A validation error as one line: ``field: reason`` parts joined by semicolons."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (an empty file is ``{}``); ConfigError with a one-line reason for a
    missing file, bad YAML or another top-level type."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded


def load_config(cls: type[ConfigT], path: str | Path | None = None, **overrides: Any) -> ConfigT:
    """Build ``cls`` from an optional YAML file, then apply non-None keyword overrides.

    Raises ConfigError with a one-line reason for a missing file, bad YAML or invalid values.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {short_validation_message(exc)}") from exc
