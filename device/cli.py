"""Command line of the device role: `tandem-device`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from common.cli import run_app
from common.errors import ConfigError, TandemError

app = typer.Typer(name="tandem-device", help="Tandem device role.", no_args_is_help=True, add_completion=False)
outbox_app = typer.Typer(help="Inspect, fill and push the durable outbox.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")
quarantine_app = typer.Typer(help="Samples the cloud refused for good: list, retry, purge.", no_args_is_help=True)
outbox_app.add_typer(quarantine_app, name="quarantine")
console = Console()
T = TypeVar("T")

ConfigOpt = typer.Option(None, "--config", "-c", help="Device config YAML (e.g. deploy/configs/device.yaml).")
StateOpt = typer.Option(None, "--state-dir", help="Device state directory (overrides the config).")
TimeoutOpt = typer.Option(60.0, "--timeout", help="Give up after this many seconds.")


@app.callback()
def _root() -> None:
    """Tandem device role."""


def _config(config: Path | None, **overrides):
    """The transport section of the device config (``deploy/configs/device.yaml``) with overrides."""
    from device.agent.config import load_agent_config

    return load_agent_config(config, {f"transport.{k}": v for k, v in overrides.items() if v is not None}).transport


def _run(coro: Awaitable[T], timeout: float) -> T:
    """Run a coroutine; gRPC failures and timeouts become one-line errors."""
    import grpc

    async def guarded() -> T:
        return await asyncio.wait_for(coro, timeout)

    try:
        return asyncio.run(guarded())
    except grpc.aio.AioRpcError as exc:
        raise TandemError(f"gateway said {exc.code().name}: {exc.details()}") from exc
    except asyncio.TimeoutError as exc:
        raise TandemError(f"gave up after {timeout:g} s (gateway unreachable?)") from exc


@app.command()
def register(
    config: Path | None = ConfigOpt,
    gateway: str | None = typer.Option(None, help="Gateway host:port."),
    device_id: str | None = typer.Option(None, "--device-id", help="This device's id."),
    cohort: str | None = typer.Option(None, help="Cohort (devices sharing updates)."),
    model_family: str | None = typer.Option(None, "--model-family"),
    model_version: str | None = typer.Option(None, "--model-version"),
    enrollment_code: str | None = typer.Option(
        None, "--enrollment-code", help="The enrollment code the cloud operator gave (transport.enrollment_secret)."
    ),
    state_dir: Path | None = StateOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Register with the gateway and save the token (re-registering rotates it)."""
    from device.transport.enroll import register_device
    from device.transport.identity import DeviceIdentity, NotRegisteredError

    cfg = _config(
        config,
        gateway=gateway,
        device_id=device_id,
        cohort=cohort,
        model_family=model_family,
        model_version=model_version,
        enrollment_secret=enrollment_code,
        state_dir=state_dir,
    )
    if enrollment_code is not None and not enrollment_code.strip():
        raise ConfigError("--enrollment-code is empty")
    try:
        previous = DeviceIdentity.load(cfg.state_dir)
    except NotRegisteredError:
        previous = None
    if previous is not None and previous.device_id != cfg.device_id:
        previous = None

    identity = _run(register_device(cfg, previous), timeout)
    console.print(
        f"registered {identity.device_id} (cohort {identity.cohort or '-'}) at {identity.gateway}; "
        f"identity saved in {DeviceIdentity.path(cfg.state_dir)}"
    )


def _open(config: Path | None, state_dir: Path | None):
    from device.transport.identity import DeviceIdentity
    from device.transport.outbox import Outbox

    cfg = _config(config, state_dir=state_dir)
    identity = DeviceIdentity.load(cfg.state_dir)
    return cfg, identity, Outbox(Path(cfg.state_dir) / "outbox.db", identity.max_sample_bytes or None)


@outbox_app.command("inspect")
def outbox_inspect(
    config: Path | None = ConfigOpt,
    state_dir: Path | None = StateOpt,
    limit: int = typer.Option(10, help="Show this many oldest pending samples."),
) -> None:
    """Show what waits in the outbox."""
    _, identity, box = _open(config, state_dir)
    try:
        s = box.stats()
        items = box.pending(max_samples=limit, max_bytes=1 << 62)
        refused = box.rejected()
    finally:
        box.close()
    console.print(
        f"device {identity.device_id}: {s.pending} pending ({s.pending_bytes} bytes), "
        f"seq {s.first_seq or '-'}..{s.last_seq or '-'}, acked up to {s.acked_seq}, next seq {s.next_seq}"
    )
    if refused:
        console.print(
            f"[yellow]{len(refused)} samples quarantined (refused by the cloud): "
            "tandem-device outbox quarantine list[/]"
        )
    if items:
        table = Table("seq", "bytes", "metadata")
        for it in items:
            table.add_row(str(it.seq), str(len(it.payload)), ", ".join(f"{k}={v}" for k, v in it.metadata.items()))
        console.print(table)


@outbox_app.command("put")
def outbox_put(
    files: list[Path] = typer.Argument(..., help="Files to queue as samples (safetensors or opaque bytes)."),
    meta: list[str] = typer.Option([], "--meta", help="Metadata key=value for every sample (repeatable)."),
    config: Path | None = ConfigOpt,
    state_dir: Path | None = StateOpt,
) -> None:
    """Queue files as samples."""
    metadata = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta expects key=value, got {item!r}")
        metadata[key] = value
    for f in files:
        if not f.is_file():
            raise ConfigError(f"sample file not found: {f}")
    _, _, box = _open(config, state_dir)
    try:
        seqs = [box.put(f.read_bytes(), {**metadata, "file": f.name}) for f in files]
    finally:
        box.close()
    console.print(f"queued {len(seqs)} samples (seq {seqs[0]}..{seqs[-1]})")


@outbox_app.command("push")
def outbox_push(
    config: Path | None = ConfigOpt, state_dir: Path | None = StateOpt, timeout: float = TimeoutOpt
) -> None:
    """Upload every pending sample now (retrying with backoff until --timeout)."""
    from device.transport.client import GatewayClient
    from device.transport.uplink import UplinkWorker

    cfg, identity, box = _open(config, state_dir)

    async def go() -> tuple[int, int]:
        async with GatewayClient(cfg, identity) as client:
            worker = UplinkWorker(client, box, cfg)
            n = await worker.push_all()
            return n, worker.stats.acked_seq

    try:
        n, acked = _run(go(), timeout)
    finally:
        box.close()
    console.print(f"pushed {n} samples; cloud acked up to seq {acked}")


SeqsArg = typer.Argument(None, help="Sample seqs (default: every quarantined sample).")


def _quarantine_seqs(box, seqs: list[int] | None) -> list[int] | None:
    """The seqs to act on (None: all); an unknown seq is a one-line error."""
    if not seqs:
        return None
    known = {q.seq for q in box.quarantined()}
    missing = sorted(set(seqs) - known)
    if missing:
        raise TandemError(f"not quarantined: seq {', '.join(map(str, missing))}")
    return list(seqs)


@quarantine_app.command("list")
def quarantine_list(config: Path | None = ConfigOpt, state_dir: Path | None = StateOpt) -> None:
    """Show quarantined samples with the cloud's reason."""
    _, _, box = _open(config, state_dir)
    try:
        items = box.quarantined()
    finally:
        box.close()
    if not items:
        console.print("no quarantined samples")
        return
    table = Table("seq", "bytes", "refused (UTC)", "reason", "metadata")
    for q in items:
        when = datetime.fromtimestamp(q.rejected_unix_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        meta = ", ".join(f"{k}={v}" for k, v in q.metadata.items())
        table.add_row(str(q.seq), str(q.size), when, q.reason, meta)
    console.print(table)


@quarantine_app.command("retry")
def quarantine_retry(
    seqs: list[int] | None = SeqsArg, config: Path | None = ConfigOpt, state_dir: Path | None = StateOpt
) -> None:
    """Put quarantined samples back in the queue (after the cause was fixed); the next push sends them."""
    _, _, box = _open(config, state_dir)
    try:
        n = box.requeue(_quarantine_seqs(box, seqs))
    finally:
        box.close()
    console.print(f"requeued {n} samples")


@quarantine_app.command("purge")
def quarantine_purge(
    seqs: list[int] | None = SeqsArg,
    yes: bool = typer.Option(False, "--yes", help="Confirm deleting the samples for good."),
    config: Path | None = ConfigOpt,
    state_dir: Path | None = StateOpt,
) -> None:
    """Delete quarantined samples for good."""
    if not yes:
        raise ConfigError("purge deletes samples for good; pass --yes to confirm")
    _, _, box = _open(config, state_dir)
    try:
        n = box.purge(_quarantine_seqs(box, seqs))
    finally:
        box.close()
    console.print(f"purged {n} samples")


@app.command()
def watch(
    out_dir: Path = typer.Option(..., "--out", help="Write each verified payload here as <target>.bin."),
    once: bool = typer.Option(False, help="Apply what is published now, then exit."),
    config: Path | None = ConfigOpt,
    state_dir: Path | None = StateOpt,
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Watch for updates; verify (digest, signature, base version) and save each payload."""
    from device.transport.client import GatewayClient
    from device.transport.fetcher import UpdateFetcher
    from device.transport.identity import DeviceIdentity

    cfg = _config(config, state_dir=state_dir)
    identity = DeviceIdentity.load(cfg.state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def apply(payload: bytes, header) -> None:
        path = out_dir / f"{header.target_version}.bin"
        path.write_bytes(payload)
        console.print(
            f"applied update {header.update_id}: {header.base_version} -> {header.target_version} "
            f"({len(payload)} bytes) -> {path}"
        )

    async def go() -> str:
        async with GatewayClient(cfg, identity) as client:
            fetcher = UpdateFetcher(client, identity, cfg, apply)
            if once:
                for o in await fetcher.sync_once():
                    if not o.applied:
                        console.print(f"[yellow]rejected update {o.update_id}: {o.reason}[/]")
            else:
                await fetcher.run(asyncio.Event())
            return fetcher.current_version

    version = _run(go(), timeout)
    console.print(f"device holds version {version}")


@app.command()
def heartbeat(
    status: str = typer.Option("ok", help="Status text."),
    config: Path | None = ConfigOpt,
    state_dir: Path | None = StateOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Send one heartbeat and print what the cloud knows."""
    from device.transport.client import GatewayClient
    from device.transport.fetcher import FetcherState

    cfg, identity, box = _open(config, state_dir)
    depth = box.stats().pending
    box.close()
    version = FetcherState(Path(cfg.state_dir) / "updates", cfg.initial_version).current_version

    async def go():
        async with GatewayClient(cfg, identity) as client:
            return await client.heartbeat(status, version, {}, depth)

    resp = _run(go(), timeout)
    console.print(
        f"cloud acked seq {resp.acked_seq}; newest update id {resp.latest_update_id}; device version {version}"
    )


SetOpt = typer.Option([], "--set", help="Override any config field: section.field=value (repeatable).")


@app.command()
def run(
    config: Path | None = ConfigOpt,
    settings: list[str] = SetOpt,
    gateway: str | None = typer.Option(None, help="Gateway host:port (transport.gateway)."),
    state_dir: Path | None = StateOpt,
    model: str | None = typer.Option(None, "--model", help="Model directory or hub id (model.source)."),
    listen: str | None = typer.Option(None, "--listen", help="Local API address (api.listen)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Prometheus port (metrics.port)."),
    offline: bool = typer.Option(False, "--offline", help="Serve without the cloud (samples wait in the outbox)."),
) -> None:
    """Run the device agent: answer, uplink what it is unsure of, take updates live."""
    from common.logs import setup_logging
    from device.agent.agent import DeviceAgent
    from device.agent.config import load_agent_config, parse_assignments

    flags = {
        "transport.gateway": gateway,
        "transport.state_dir": str(state_dir) if state_dir else None,
        "model.source": model,
        "api.listen": listen,
        "metrics.port": metrics_port,
    }
    overrides = {**{k: v for k, v in flags.items() if v is not None}, **parse_assignments(settings)}
    cfg = load_agent_config(config, overrides)
    setup_logging(cfg.log_level, cfg.log_json)

    async def serve() -> None:
        import signal

        from device.agent.service import AgentService

        service = AgentService(DeviceAgent(cfg, connect=not offline))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run_until(stop)

    asyncio.run(serve())


@app.command()
def status(
    config: Path | None = ConfigOpt,
    settings: list[str] = SetOpt,
    listen: str | None = typer.Option(None, "--listen", help="The agent's local API address (api.listen)."),
    timeout: float = typer.Option(5.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Show what the running agent holds and has done."""
    from protocol.tandem.v1 import agent_pb2

    s = _call_agent(config, settings, listen, timeout, "Status", agent_pb2.AgentStatusRequest())
    table = Table("", "", show_header=False, box=None)
    rows = [
        ("device", s.device_id or "-"),
        ("adapter", f"{s.adapter_version} (digest {s.adapter_digest[:12]}; previous {s.previous_version or '-'})"),
        ("model", f"{s.model_source} (SparseVLM {'on' if s.sparse_enabled else 'off'})"),
        ("answers", f"{s.requests} ({s.samples_selected} chosen for the cloud; {s.queue_depth} queued now)"),
        ("outbox", f"{s.outbox_depth} samples, {s.outbox_bytes} bytes"),
        ("updates", f"{s.swaps} swapped, {s.rollbacks} rolled back, {s.updates_rejected} rejected"),
        ("cloud", f"{'connected' if s.gateway_connected else 'not connected'}, {s.heartbeats} heartbeats"),
        ("sources", ", ".join(s.sources) or "-"),
        ("uptime", f"{s.uptime_s:.0f} s"),
    ]
    if s.last_rollback:
        rows.append(("last rollback", s.last_rollback))
    if s.last_rejection:
        rows.append(("last rejection", s.last_rejection))
    for k, v in rows:
        table.add_row(f"[bold]{k}[/]", v)
    console.print(table)


def _agent_address(config: Path | None, settings: list[str], listen: str | None) -> str:
    """The running agent's local API: ``--listen``, else what it wrote to its state directory, else api.listen."""
    from device.agent.config import load_agent_config, parse_assignments
    from device.agent.service import ADDRESS_FILE

    flags = {"api.listen": listen} if listen else {}
    cfg = load_agent_config(config, {**flags, **parse_assignments(settings)})
    address = cfg.api.listen
    written = cfg.state_dir / ADDRESS_FILE
    if not listen and written.is_file():
        address = written.read_text().strip()  # what the running agent bound (port 0 picks one)
    if not address:
        raise ConfigError("api.listen is empty: the agent has no local API to ask")
    return address


def _call_agent(config: Path | None, settings: list[str], listen: str | None, timeout: float, method: str, request):
    """One call to the running agent's local API; gRPC failures become one-line errors."""
    import grpc

    from protocol.tandem.v1 import agent_pb2_grpc

    address = _agent_address(config, settings, listen)

    async def call():
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(agent_pb2_grpc.DeviceAgentStub(channel), method)(request, timeout=timeout)

    try:
        return asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise TandemError(f"no agent answers on {address} ({code.name}); is `tandem-device run` up?") from None
        raise TandemError(f"agent said {code.name}: {exc.details()}") from None


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question about the image."),
    image: Path = typer.Option(..., "--image", "-i", help="A JPEG or PNG file."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", min=0, help="Answer tokens at most (0: model default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole response as JSON."),
    config: Path | None = ConfigOpt,
    settings: list[str] = SetOpt,
    listen: str | None = typer.Option(None, "--listen", help="The agent's local API address (api.listen)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Ask the running agent a question about an image and print its answer."""
    import json

    from google.protobuf.json_format import MessageToDict

    from protocol.tandem.v1 import agent_pb2

    if not image.is_file():
        raise ConfigError(f"image file not found: {image}")
    request = agent_pb2.AskRequest(image=image.read_bytes(), question=question, max_new_tokens=max_new_tokens)
    reply = _call_agent(config, settings, listen, timeout, "Ask", request)
    if as_json:
        fields = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        typer.echo(json.dumps(fields))
        return
    console.print(reply.answer, markup=False, highlight=False)
    console.print(
        f"[dim]confidence {reply.confidence:.3f} over {len(reply.tokens)} token(s); adapter {reply.adapter_version}; "
        f"visual tokens {reply.visual_tokens_kept}/{reply.visual_tokens_total}; {reply.latency_ms:.0f} ms"
        f"{'; sent to the cloud' if reply.uplinked else ''}[/]"
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
