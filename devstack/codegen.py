"""Generate the Python stubs and the Envoy descriptor set from protos/.

`make gen` runs this. Outputs (all git-ignored, never edited by hand):

- kbmesh/{taskmanager,knowledge}/v1/*_pb2.py, *_pb2_grpc.py and .pyi stubs;
- build/gateway/kbmesh.pb, the descriptor set Envoy's transcoder reads
  (with google/rpc status and error details, or Envoy silently stops
  converting gRPC errors to JSON);
- build/third_party/protos, links to the google/* protos of the
  googleapis-common-protos wheel so `buf lint` resolves imports offline.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import google.api.annotations_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUILD = ROOT / "build"
DESCRIPTOR = BUILD / "gateway" / "kbmesh.pb"
THIRD_PARTY = BUILD / "third_party" / "protos"
# Where the googleapis-common-protos wheel keeps google/api/*.proto.
GOOGLE_ROOT = Path(google.api.annotations_pb2.__file__).resolve().parent.parent.parent
GRPC_TOOLS_INCLUDE = Path(protoc.__file__).resolve().parent / "_proto"
# google/* files the gateway descriptor needs beyond our own imports.
EXTRA_DESCRIPTOR_FILES = ("google/rpc/status.proto", "google/rpc/error_details.proto")
# The virtualenv's bin/, where mypy-protobuf's protoc plugins are.
BIN = Path(sys.executable).parent
GENERATED_PACKAGES = ("kbmesh/taskmanager", "kbmesh/knowledge")


def our_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def run_protoc(args: list[str]) -> None:
    cmd = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{GOOGLE_ROOT}", f"-I{GRPC_TOOLS_INCLUDE}", *args]
    if protoc.main(cmd) != 0:
        raise SystemExit(f"protoc failed: {' '.join(cmd)}")


def generate_python() -> None:
    for pkg in GENERATED_PACKAGES:
        shutil.rmtree(ROOT / pkg, ignore_errors=True)
    run_protoc(
        [
            f"--python_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={ROOT}",
            f"--mypy_grpc_out={ROOT}",
            *our_protos(),
        ]
    )
    for pkg in GENERATED_PACKAGES:
        for folder in [ROOT / pkg, *(p for p in (ROOT / pkg).rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
            (folder / "py.typed").touch()


def generate_descriptor() -> None:
    DESCRIPTOR.parent.mkdir(parents=True, exist_ok=True)
    run_protoc(
        [
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={DESCRIPTOR}",
            *our_protos(),
            *EXTRA_DESCRIPTOR_FILES,
        ]
    )


def link_third_party() -> None:
    """Expose the wheel's google/api and google/rpc protos to buf."""
    shutil.rmtree(THIRD_PARTY, ignore_errors=True)
    for sub in ("google/api", "google/rpc"):
        target = THIRD_PARTY / sub
        target.mkdir(parents=True)
        for proto in sorted((GOOGLE_ROOT / sub).glob("*.proto")):
            os.symlink(proto, target / proto.name)
    protobuf_dir = THIRD_PARTY / "google" / "protobuf"
    protobuf_dir.mkdir(parents=True)
    for proto in sorted((GRPC_TOOLS_INCLUDE / "google" / "protobuf").glob("*.proto")):
        os.symlink(proto, protobuf_dir / proto.name)


def main() -> None:
    generate_python()
    generate_descriptor()
    link_third_party()
    print(f"generated stubs for {len(our_protos())} protos and {DESCRIPTOR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
