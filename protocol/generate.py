"""Regenerate the ``tandem.v1`` Python messages, gRPC stubs and ``.pyi`` type stubs.

``python -m protocol.generate`` rewrites the committed files in ``protocol/tandem/v1``;
``python -m protocol.generate --check`` exits 1 and names the files that differ from a fresh generation.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protocol") / "tandem" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PYI_HEADER = "# ruff: noqa\n# fmt: off\n"


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """The ``.proto`` sources, relative to the repository root (their import root)."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed beside the running interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install mypy-protobuf")
    return found


def generate(out_dir: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every proto under ``root`` and write the outputs below ``out_dir``; return them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in proto_files(root)],
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {result.stderr.strip()}")
    written = sorted(p for p in (out_dir / PROTO_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    for path in written:
        if path.suffix == ".pyi":  # mypy-protobuf output does not follow the project's lint rules
            path.write_text(PYI_HEADER + path.read_text())
    return written


def committed_files(root: Path = REPO_ROOT) -> list[Path]:
    """The generated files currently present in the source tree."""
    return sorted(p for p in (root / PROTO_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def diff_against_committed(root: Path = REPO_ROOT) -> list[str]:
    """Names of generated files that are missing, extra or different compared to a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp), root)}
        current = {p.name: p for p in committed_files(root)}
        problems = [f"missing: {n}" for n in sorted(fresh.keys() - current.keys())]
        problems += [f"stale extra file: {n}" for n in sorted(current.keys() - fresh.keys())]
        problems += [
            f"differs: {n}"
            for n in sorted(fresh.keys() & current.keys())
            if not filecmp.cmp(fresh[n], current[n], shallow=False)
        ]
    return problems


def main(argv: list[str] | None = None) -> int:
    """Regenerate in place, or with ``--check`` report differences and return 1 if any."""
    parser = argparse.ArgumentParser(prog="python -m protocol.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        problems = diff_against_committed()
        for line in problems:
            print(line)
        return 1 if problems else 0
    for stale in committed_files():
        stale.unlink()
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
