"""The PostgreSQL deployment files agree with each other and with the code: the compose file and the
Kubernetes gateway take the DSN from where the config says, and the shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cloud.config import POSTGRES_DSN_ENV, GatewayConfig
from common.config import load_config
from common.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_postgres_config_loads_with_the_dsn_from_the_environment(monkeypatch):
    monkeypatch.delenv(POSTGRES_DSN_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"store postgres needs postgres_dsn or \\${POSTGRES_DSN_ENV}"):
        load_config(GatewayConfig, DEPLOY / "configs" / "cloud-postgres.yaml")
    monkeypatch.setenv(POSTGRES_DSN_ENV, "postgresql://tandem:pw@db:5432/tandem")
    cfg = load_config(GatewayConfig, DEPLOY / "configs" / "cloud-postgres.yaml")
    assert cfg.store == "postgres" and cfg.dsn() == "postgresql://tandem:pw@db:5432/tandem"
    assert "pw" not in repr(cfg)  # the DSN is a secret: never printed with the config
    assert load_config(GatewayConfig, DEPLOY / "configs" / "cloud.yaml").store == "sqlite"


def test_compose_runs_the_gateway_on_its_postgres():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway, postgres = services["gateway"], services["postgres"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in postgres
    assert "@postgres:5432/" in gateway["environment"][POSTGRES_DSN_ENV]
    config_mount = next(v for v in gateway["volumes"] if v.endswith(":/etc/tandem/cloud-postgres.yaml:ro"))
    assert (DEPLOY / config_mount.split(":")[0]).resolve() == (DEPLOY / "configs" / "cloud-postgres.yaml").resolve()
    assert gateway["command"][-1] == "/etc/tandem/cloud-postgres.yaml"


def test_kubernetes_gateway_takes_the_dsn_from_the_secret(monkeypatch):
    secret = _docs(DEPLOY / "cloud" / "postgres-secret.yaml")[0]
    objects = {d["kind"]: d for d in _docs(DEPLOY / "cloud" / "gateway.yaml")}
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in container["env"] if e["name"] == POSTGRES_DSN_ENV)["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    monkeypatch.setenv(POSTGRES_DSN_ENV, secret["stringData"][ref["key"]])
    cfg = GatewayConfig(**yaml.safe_load(objects["ConfigMap"]["data"]["cloud.yaml"]))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.store == "postgres" and Path(cfg.signing_key).parent.as_posix() in mounts
    assert any(Path(cfg.blobs.directory).is_relative_to(m) for m in mounts)
    selector = objects["Service"]["spec"]["selector"]
    assert selector.items() <= objects["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_the_two_compose_files_combine_without_a_host_port_twice():
    """`docker compose -f compose.yaml -f compose.fleet.yaml up`: every published host port is published once."""
    published = []
    for name in ("compose.yaml", "compose.fleet.yaml"):
        for svc in yaml.safe_load((DEPLOY / name).read_text())["services"].values():
            published += [str(p).split(":")[0] for p in svc.get("ports", [])]
    assert published and len(published) == len(set(published)), sorted(published)
