"""The agent's one typed config: model, adapter, sparse, uts, transport, api, sources, guard, metrics.

Loaded from YAML (``deploy/configs/device.yaml``); every field can be overridden from the command line as
``--set section.field=value`` (the value is parsed as YAML). Unknown keys are refused with their dotted name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from common.adapters import AdapterConfig
from common.config import StrictConfig, parse_assignments, read_yaml_mapping, set_dotted, short_validation_message

__all__ = ["AgentConfig", "load_agent_config", "parse_assignments"]
from common.errors import ConfigError
from common.modeling import DType, Quantization
from device.sparse.config import SparseConfig
from device.transport.config import DeviceClientConfig
from device.uts.sampler import UTSConfig

REFERENCE_DEVICE_MODEL = "sim/zoo/reference/base/device"


class ModelSettings(StrictConfig):
    """Which model to load and how."""

    source: str = REFERENCE_DEVICE_MODEL
    """A model directory or a hub id (``common.modeling.load_mllm``)."""
    quantization: Quantization = "none"
    device_map: str = "cpu"
    """Where the weights go: ``cpu``, ``cuda``, ``cuda:0``, ``auto``."""
    dtype: DType = "auto"
    """Weights (and NF4 compute) dtype: ``float16`` on a Jetson or GPU, ``auto`` keeps the stored dtype."""
    prompt_template: str | None = None
    """Chat prompt with ``{question}`` and the family's image placeholder; None: the family's own (LLaVA-1.5's
    ``USER: <image>\n{question} ASSISTANT:``, Qwen2-VL's chat template; ``common.mllm_family``)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Answer tokens at most when an Ask names none (greedy, stops at end-of-sequence). ``None``: the
    checkpoint's ``generation_config.max_new_tokens`` (the shape members set their family's default), else 1:
    the zoo's one-word answers."""


class AdapterSettings(AdapterConfig):
    """LoRA shape (shared with the cloud's student) and where version 0 comes from."""

    init: Path | None = None
    """A PEFT adapter directory for version 0; without it LoRA is initialised from ``seed`` like the cloud's."""


class UTSSettings(UTSConfig):
    """UTS as the agent runs it."""

    enabled: bool = True
    period_s: float = Field(60.0, gt=0)
    """Length of one uplink budget period (``gate.budget`` samples or bytes per period)."""


class ApiSettings(StrictConfig):
    """The local API for applications on the device, and its micro-batcher."""

    listen: str = "127.0.0.1:50151"
    """``host:port`` (use 127.0.0.1) or ``unix:///path/agent.sock``; an empty string turns the API off."""
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(256, ge=1)
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_question_chars: int = Field(512, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_new_tokens_limit: int = Field(256, ge=1)
    """The most answer tokens one Ask may ask for."""


class DirectorySourceSettings(StrictConfig):
    """Images dropped into a directory; the question is ``<image stem>.txt`` beside it, else ``questions``."""

    path: Path
    questions: list[str] = Field(default_factory=list)
    interval_s: float = Field(1.0, gt=0)


class CameraSourceSettings(StrictConfig):
    """An OpenCV camera (index or URL/file), one frame per interval, asked every configured question."""

    device: int | str = 0
    questions: list[str] = Field(min_length=1)
    interval_s: float = Field(1.0, gt=0)


class SourcesSettings(StrictConfig):
    """Input sources besides the API."""

    directory: DirectorySourceSettings | None = None
    camera: CameraSourceSettings | None = None


class GuardSettings(StrictConfig):
    """Label-free regression guard: roll back when the answers after a swap are less confident."""

    enabled: bool = True
    window: int = Field(32, ge=1)
    """K: answers before and after a swap that are compared."""
    margin: float = Field(0.1, ge=0)
    """Roll back when the mean metric falls by more than this (absolute)."""
    metric: Literal["confidence", "entropy"] = "confidence"


class MetricsSettings(StrictConfig):
    """Prometheus endpoint (``port: null`` turns it off)."""

    host: str = "127.0.0.1"
    port: int | None = Field(9465, ge=0, le=65535)
    """9465: beside a cloud gateway's 9464 on the same host."""


class LinkSettings(StrictConfig):
    """Link capacity told to the cloud in heartbeats (0: unknown)."""

    downlink_bytes_per_s: int = Field(0, ge=0)
    uplink_bytes_per_s: int = Field(0, ge=0)


class AgentConfig(StrictConfig):
    """Everything ``tandem-device run`` needs."""

    transport: DeviceClientConfig = DeviceClientConfig()
    model: ModelSettings = ModelSettings()
    adapter: AdapterSettings = AdapterSettings()
    sparse: SparseConfig = SparseConfig()
    uts: UTSSettings = UTSSettings()
    api: ApiSettings = ApiSettings()
    sources: SourcesSettings = SourcesSettings()
    guard: GuardSettings = GuardSettings()
    metrics: MetricsSettings = MetricsSettings()
    link: LinkSettings = LinkSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    @property
    def state_dir(self) -> Path:
        return Path(self.transport.state_dir)


def load_agent_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """The config from an optional YAML file with dotted overrides applied (a None value sets null).

    Raises ConfigError with one line naming the offending key for unknown keys or invalid values.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid device config: {short_validation_message(exc)}") from None
