"""Regenerate the CRI Python modules from ``protos/api.proto``.

    python3 -m crishim.cri.protogen            # rewrite crishim/cri/api_pb2*.py(i)
    python3 -m crishim.cri.protogen OUTDIR     # write them somewhere else

The generated modules are committed; a test regenerates them into a temporary
directory and compares bytes, so edit the .proto and rerun this, never the
generated files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO_DIR = REPO_ROOT / "protos"
PROTO_NAME = "api.proto"

#: The files ``generate`` writes, relative to its output directory.
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")

_GRPC_IMPORT = re.compile(r"^import api_pb2 as api__pb2$", re.MULTILINE)


class ProtocError(RuntimeError):
    pass


def generate(outdir: str | Path, proto_dir: str | Path = PROTO_DIR) -> None:
    """Run protoc (from grpcio-tools) on api.proto and write the modules to outdir.

    The grpc module's absolute ``import api_pb2`` is rewritten to the
    package-relative ``from . import api_pb2`` so it works inside ``crishim.cri``.
    """
    from grpc_tools import protoc  # imported lazily: a test-time/dev dependency

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    proto_dir = Path(proto_dir)
    if not (proto_dir / PROTO_NAME).is_file():
        raise FileNotFoundError(proto_dir / PROTO_NAME)

    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--python_out={outdir}",
        f"--pyi_out={outdir}",
        f"--grpc_python_out={outdir}",
        PROTO_NAME,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise ProtocError(f"protoc failed with exit status {rc}: {' '.join(args[1:])}")

    grpc_file = outdir / "api_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed, n = _GRPC_IMPORT.subn("from . import api_pb2 as api__pb2", text)
    if n != 1:
        raise ProtocError(f"expected one 'import api_pb2' line in {grpc_file}, found {n}")
    grpc_file.write_text(fixed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    outdir = Path(argv[0]) if argv else PACKAGE_DIR
    generate(outdir)
    for name in GENERATED:
        print(outdir / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
