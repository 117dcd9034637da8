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


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``section.field`` in a config mapping (missing sections are created); ConfigError for a non-section."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["api.max_batch=4", ...]`` -> ``{"api.max_batch": 4}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value is not valid YAML: {raw!r}") from None
    return out


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, assignments: dict[str, Any] | None = None, **overrides: Any
) -> ConfigT:
    """Build ``cls`` from an optional YAML file, then apply non-None keyword overrides, then dotted
    ``assignments`` (``--set section.field=value``, see ``parse_assignments``).

    Raises ConfigError with a one-line reason for a missing file, bad YAML or invalid values.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in (assignments or {}).items():
        set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {short_validation_message(exc)}") from exc
