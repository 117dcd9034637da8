"""Command line of the cloud role: `tandem-cloud`."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from common.cli import run_app
from common.config import load_config, parse_assignments
from common.errors import ConfigError, TandemError

app = typer.Typer(name="tandem-cloud", help="Tandem cloud role.", no_args_is_help=True, add_completion=False)
updates_app = typer.Typer(help="Publish and list signed updates.", no_args_is_help=True)
devices_app = typer.Typer(help="Provision, inspect, move and revoke devices.", no_args_is_help=True)
samples_app = typer.Typer(help="Inspect the sample store.", no_args_is_help=True)
jobs_app = typer.Typer(help="See and steer adaptation jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(updates_app, name="updates")
app.add_typer(devices_app, name="devices")
app.add_typer(samples_app, name="samples")
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="GatewayConfig YAML (e.g. deploy/configs/cloud.yaml).")
DataDirOpt = typer.Option(None, "--data-dir", help="Gateway data directory (overrides the config).")
SetOpt = typer.Option([], "--set", help="Override any config field: section.field=value (repeatable).")


@app.callback()
def _root() -> None:
    """Tandem cloud role."""


def _gateway_config(config: Path | None, settings: list[str] | None = None, **overrides):
    from cloud.config import GatewayConfig

    return load_config(GatewayConfig, config, parse_assignments(settings or []), **overrides)


@app.command()
def serve(
    config: Path | None = ConfigOpt,
    settings: list[str] = SetOpt,
    role: str = typer.Option("all", help="all (gateway + trainer), gateway, or trainer."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (default: RAY_ADDRESS, else start a local Ray)."
    ),
    executor: str | None = typer.Option(None, help="ray or inprocess (overrides the config)."),
    host: str | None = typer.Option(None, help="Address to bind."),
    port: int | None = typer.Option(None, help="Port to bind (0 picks a free one)."),
    data_dir: Path | None = DataDirOpt,
    metrics_port: int | None = typer.Option(None, help="Serve Prometheus /metrics on this port."),
    ready_file: Path | None = typer.Option(None, help="Write host:port here once serving."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    """Run the gateway, the scheduler and the trainer (or one role) until interrupted."""
    from cloud.adaptation.runtime import serve as serve_roles
    from common.logs import setup_logging

    if role not in ("all", "gateway", "trainer"):
        raise ConfigError(f"--role must be all, gateway or trainer, not {role!r}")
    if executor not in (None, "ray", "inprocess"):
        raise ConfigError(f"--executor must be ray or inprocess, not {executor!r}")
    cfg = _gateway_config(config, settings, host=host, port=port, data_dir=data_dir, metrics_port=metrics_port)
    if ray_address is not None:
        cfg.adaptation.ray.address = ray_address
    if executor is not None:
        cfg.adaptation.executor = executor  # type: ignore[assignment]
    setup_logging(log_level, cfg.log_json)
    asyncio.run(serve_roles(cfg, role, ready_file))  # type: ignore[arg-type]


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="Private key file to write (public key goes to <out>.pub)."),
    force: bool = typer.Option(False, help="Overwrite an existing key."),
) -> None:
    """Create the Ed25519 key that signs updates."""
    from common.signing import generate_private_key, key_id, save_private_key

    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite")
    key = generate_private_key()
    save_private_key(key, out)
    console.print(f"wrote {out} and {out}.pub (key id {key_id(key)})")


@app.command("dev-certs")
def dev_certs(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.crt/.key and client certs."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="Server name or IP (repeatable)."),
    client: list[str] = typer.Option(["device"], "--client", help="Client certificate name (repeatable)."),
) -> None:
    """Write a development CA with server and client certificates for TLS / mutual TLS trials."""
    from cloud.devcerts import write_dev_certs

    paths = write_dev_certs(out, host, client)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def _registry(config: Path | None, data_dir: Path | None):
    from cloud.gateway.server import load_or_create_signing_key
    from cloud.stores import open_update_registry

    cfg = _gateway_config(config, data_dir=data_dir)
    return open_update_registry(cfg, cfg.data_dir, load_or_create_signing_key(cfg), cfg.sqlite_synchronous)


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta expects key=value, got {item!r}")
        meta[key] = value
    return meta


@updates_app.command("publish")
def updates_publish(
    payload: Path = typer.Argument(..., help="Payload file (safetensors bytes from the learning core)."),
    base: str = typer.Option(..., "--base", help="Version the device must hold."),
    target: str = typer.Option(..., "--target", help="Version after applying."),
    device: str | None = typer.Option(None, "--device", help="Address one device."),
    cohort: str | None = typer.Option(None, "--cohort", help="Address every device of a cohort."),
    meta: list[str] = typer.Option([], "--meta", help="Extra signed metadata key=value (repeatable)."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Sign and store an update; running gateways announce it to watchers within their poll interval."""
    if (device is None) == (cohort is None):
        raise ConfigError("give exactly one of --device or --cohort")
    if not payload.is_file():
        raise ConfigError(f"payload file not found: {payload}")
    registry = _registry(config, data_dir)
    try:
        data = payload.read_bytes()
        if device is not None:
            rec = registry.publish(device, base, target, data, _parse_meta(meta))
        else:
            rec = registry.publish_cohort(cohort or "", base, target, data, _parse_meta(meta))
    finally:
        registry.close()
    console.print(
        f"published update {rec.update_id}: {rec.base_version} -> {rec.target_version}, "
        f"{rec.size} bytes, sha256 {rec.sha256_hex[:16]}..., key {rec.key_id}"
    )


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


@updates_app.command("list")
def updates_list(
    device: str | None = typer.Option(None, "--device", help="Only this device's updates."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """List published updates."""
    registry = _registry(config, data_dir)
    try:
        records = registry.list(device_id=device)
    finally:
        registry.close()
    table = Table("id", "device", "cohort", "base", "target", "bytes", "sha256", "created (UTC)")
    for r in records:
        table.add_row(
            str(r.update_id),
            r.device_id or "-",
            r.cohort or "-",
            r.base_version,
            r.target_version,
            str(r.size),
            r.sha256_hex[:16],
            _when(r.created_unix_ms),
        )
    console.print(table)


def _devices(config: Path | None, data_dir: Path | None, create: bool = False):
    from cloud.stores import open_device_registry

    cfg = _gateway_config(config, data_dir=data_dir)
    path = Path(cfg.data_dir) / "devices.db"
    if cfg.store == "sqlite" and not path.exists() and not create:
        raise TandemError(f"no device database at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_device_registry(cfg, cfg.data_dir, cfg.sqlite_synchronous)


def _check_name(kind: str, value: str, allow_empty: bool) -> None:
    from protocol.limits import COHORT_RE, DEVICE_ID_RE

    if not (COHORT_RE if allow_empty else DEVICE_ID_RE).match(value):
        raise ConfigError(f"{kind} must be {'0' if allow_empty else '1'}-128 chars of [A-Za-z0-9._-]: {value!r}")


@devices_app.command("list")
def devices_list(config: Path | None = ConfigOpt, data_dir: Path | None = DataDirOpt) -> None:
    """List registered devices with their applied version and last heartbeat."""
    reg = _devices(config, data_dir)
    try:
        table = Table("device", "state", "cohort", "model", "applied", "status", "last seen (UTC)")
        for d in reg.list():
            table.add_row(
                d.device_id,
                d.state,
                d.cohort or "-",
                f"{d.model_family}@{d.model_version}" if d.model_family else "-",
                d.applied_version or "-",
                d.status or "-",
                _when(d.last_seen_unix_ms),
            )
    finally:
        reg.close()
    console.print(table)


@devices_app.command("revoke")
def devices_revoke(
    device: str = typer.Argument(..., help="Device id."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Invalidate a device's token; only `devices add` lets the id register again."""
    reg = _devices(config, data_dir)
    try:
        if not reg.revoke(device):
            raise TandemError(f"no device {device!r}")
    finally:
        reg.close()
    console.print(f"revoked {device}")


@devices_app.command("add")
def devices_add(
    device: str = typer.Argument(..., help="Device id."),
    cohort: str = typer.Option("", "--cohort", help="Cohort the device belongs to (the operator decides)."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Provision a device (or re-admit a revoked one) and print its one-time enrollment code."""
    from cloud.devices import DeviceStateError

    _check_name("device id", device, allow_empty=False)
    _check_name("cohort", cohort, allow_empty=True)
    reg = _devices(config, data_dir, create=True)
    try:
        code = reg.provision(device, cohort)
    except DeviceStateError as exc:
        raise TandemError(str(exc)) from exc
    finally:
        reg.close()
    console.print(f"provisioned {device} (cohort {cohort or '-'}); enrollment code, shown once:")
    console.print(code, highlight=False, soft_wrap=True)


@devices_app.command("set-cohort")
def devices_set_cohort(
    device: str = typer.Argument(..., help="Device id."),
    cohort: str = typer.Argument(..., help="New cohort ('' for none)."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Move a device to another cohort (it receives that cohort's updates from its next watch)."""
    _check_name("cohort", cohort, allow_empty=True)
    reg = _devices(config, data_dir)
    try:
        if not reg.set_cohort(device, cohort):
            raise TandemError(f"no device {device!r}")
    finally:
        reg.close()
    console.print(f"{device} is now in cohort {cohort or '-'}")


@samples_app.command("list")
def samples_list(config: Path | None = ConfigOpt, data_dir: Path | None = DataDirOpt) -> None:
    """Samples stored per device."""
    from cloud.stores import open_sample_store

    cfg = _gateway_config(config, data_dir=data_dir)
    if cfg.store == "sqlite" and not (Path(cfg.data_dir) / "samples.db").exists():
        raise TandemError(f"no sample store in {cfg.data_dir}")
    store = open_sample_store(cfg, cfg.data_dir)
    try:
        table = Table("device", "samples", "highest seq")
        for dev in store.devices():
            table.add_row(dev, str(store.count(dev)), str(store.high_water(dev)))
    finally:
        store.close()
    console.print(table)


def _jobs(config: Path | None, data_dir: Path | None):
    from cloud.stores import open_job_store

    cfg = _gateway_config(config, data_dir=data_dir)
    path = cfg.adaptation_dir / "jobs.db"
    if cfg.store == "sqlite" and not path.exists():
        raise TandemError(f"no job database at {path}")
    return open_job_store(cfg, cfg.adaptation_dir, cfg.sqlite_synchronous)


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(None, help="Only jobs in this state (queued, running, done, failed)."),
    subject: str | None = typer.Option(None, help="Only this device or cohort."),
    limit: int = typer.Option(50, help="At most this many (newest first)."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """List adaptation jobs, newest first."""
    from cloud.adaptation.jobs import STATES

    if state is not None and state not in STATES:
        raise ConfigError(f"--state must be one of {', '.join(STATES)}")
    store = _jobs(config, data_dir)
    try:
        jobs = store.list(state=state, subject=subject, limit=limit)  # type: ignore[arg-type]
    finally:
        store.close()
    columns = ("id", "subject", "family", "state", "outcome", "attempts", "samples", "update", "created (UTC)", "error")
    table = Table(*columns)
    for j in jobs:
        table.add_row(
            str(j.job_id),
            j.key,
            j.family,
            j.state,
            j.outcome or "-",
            str(j.attempts),
            str(j.samples),
            str(j.update_id or "-"),
            _when(j.created_unix_ms),
            (j.error or j.result.get("reason", ""))[:60] or "-",
        )
    console.print(table)


def _job_or_fail(store, job_id: int):
    job = store.get(job_id)
    if job is None:
        raise TandemError(f"no job {job_id}")
    return job


@jobs_app.command("show")
def jobs_show(
    job_id: int = typer.Argument(..., help="Job id."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Everything recorded about one job (as JSON)."""
    import dataclasses
    import json

    store = _jobs(config, data_dir)
    try:
        job = _job_or_fail(store, job_id)
    finally:
        store.close()
    console.print_json(json.dumps(dataclasses.asdict(job)))


@jobs_app.command("retry")
def jobs_retry(
    job_id: int = typer.Argument(..., help="A failed job's id."),
    config: Path | None = ConfigOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Requeue a failed job with fresh attempts."""
    store = _jobs(config, data_dir)
    try:
        job = store.retry(job_id)
    finally:
        store.close()
    console.print(f"job {job.job_id} ({job.key}) queued again")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
