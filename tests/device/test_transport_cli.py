"""tandem-device and tandem-cloud end to end against a gateway process, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transport_support import gateway_process, sample_payload

from cloud.cli import main as cloud_main
from device.cli import main as device_main


def _run(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_register_put_push_publish_watch(tmp_path, capsys):
    data, state = tmp_path / "cloud", tmp_path / "dev"
    with gateway_process(data) as (_, address):
        code, out, _ = _run(
            device_main,
            ["register", "--gateway", address, "--device-id", "cam-7", "--state-dir", str(state)],
            capsys,
        )
        assert code == 0 and "registered cam-7" in out
        files = []
        for i in range(3):
            f = tmp_path / f"s{i}.bin"
            f.write_bytes(sample_payload(i, 1000))
            files.append(str(f))
        code, out, _ = _run(
            device_main, ["outbox", "put", *files, "--meta", "kind=test", "--state-dir", str(state)], capsys
        )
        assert code == 0 and "queued 3 samples (seq 1..3)" in out
        code, out, _ = _run(device_main, ["outbox", "inspect", "--state-dir", str(state)], capsys)
        assert f"3 pending ({sum(Path(f).stat().st_size for f in files)} bytes)" in out
        code, out, _ = _run(device_main, ["outbox", "push", "--state-dir", str(state)], capsys)
        assert code == 0 and "pushed 3 samples; cloud acked up to seq 3" in out
        code, out, _ = _run(cloud_main, ["samples", "list", "--data-dir", str(data)], capsys)
        assert "cam-7" in out and "3" in out
        payload = tmp_path / "update.bin"
        payload.write_bytes(b"delta" * 100)
        code, out, _ = _run(
            cloud_main,
            [
                "updates",
                "publish",
                str(payload),
                "--device",
                "cam-7",
                "--base",
                "v0",
                "--target",
                "v1",
                "--data-dir",
                str(data),
            ],
            capsys,
        )
        assert code == 0 and "published update 1: v0 -> v1" in out
        code, out, _ = _run(
            device_main,
            [
                "watch",
                "--once",
                "--out",
                str(tmp_path / "applied"),
                "--state-dir",
                str(state),
                "--timeout",
                "30",
            ],
            capsys,
        )
        assert code == 0 and "device holds version v1" in out
        assert (tmp_path / "applied" / "v1.bin").read_bytes() == b"delta" * 100
        code, out, _ = _run(device_main, ["heartbeat", "--state-dir", str(state)], capsys)
        assert "cloud acked seq 3; newest update id 1; device version v1" in out
        code, out, _ = _run(cloud_main, ["devices", "list", "--data-dir", str(data)], capsys)
        assert "cam-7" in out and "v1" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        (
            device_main,
            ["outbox", "inspect", "--state-dir", str(tmp_path / "none")],
            "run `tandem-device register`",
        ),
        (device_main, ["register", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (
            device_main,
            [
                "register",
                "--gateway",
                "127.0.0.1:1",
                "--device-id",
                "x",
                "--state-dir",
                str(tmp_path / "s"),
                "--timeout",
                "5",
            ],
            "gateway said UNAVAILABLE",
        ),
        (
            cloud_main,
            [
                "updates",
                "publish",
                str(tmp_path / "nofile"),
                "--base",
                "a",
                "--target",
                "b",
                "--data-dir",
                str(tmp_path / "c"),
            ],
            "exactly one of --device or --cohort",
        ),
        (
            cloud_main,
            [
                "updates",
                "publish",
                str(tmp_path / "nofile"),
                "--device",
                "d",
                "--base",
                "a",
                "--target",
                "b",
                "--data-dir",
                str(tmp_path / "c"),
            ],
            "payload file not found",
        ),
        (cloud_main, ["keygen", "--out", str(tmp_path)], "exists; pass --force"),
        (cloud_main, ["serve", "--port", "99999"], "port"),
    ]
    for main, argv, expected in cases:
        code, _, err = _run(main, argv, capsys)
        assert code == 1, argv
        assert expected in err and err.strip().count("\n") == 0, err


def test_publish_rejects_bad_versions(tmp_path, capsys):
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"x")
    code, _, err = _run(
        cloud_main,
        [
            "updates",
            "publish",
            str(payload),
            "--device",
            "d",
            "--base",
            "v1",
            "--target",
            "v1",
            "--data-dir",
            str(tmp_path / "c"),
        ],
        capsys,
    )
    assert code == 1 and "must differ" in err


def test_push_gives_up_after_timeout_and_keeps_samples(tmp_path, capsys):
    from device.transport.identity import DeviceIdentity
    from device.transport.outbox import Outbox

    state = tmp_path / "dev"
    DeviceIdentity("d", "t", "", "127.0.0.1:1", "", 65536, 1 << 20).save(state)
    box = Outbox(state / "outbox.db")
    box.put(sample_payload(0, 500))
    box.close()
    code, _, err = _run(device_main, ["outbox", "push", "--state-dir", str(state), "--timeout", "1"], capsys)
    assert code == 1 and "gave up after 1 s" in err
    assert Outbox(state / "outbox.db").stats().pending == 1
