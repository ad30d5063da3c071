"""Generate the TypeScript and Go stubs of the kv contract, or check that they are up to date.

The generated code is committed:

    clients/typescript/src/gen/   protoc-gen-es (npm @bufbuild/protoc-gen-es, pinned in
                                  clients/typescript/package-lock.json): kv/v1/*_pb.ts and the
                                  google/api/*_pb.ts files that the contract imports
    clients/go/kv/                protoc-gen-go and protoc-gen-go-grpc (Debian bookworm packages
                                  protoc-gen-go, protoc-gen-go-grpc): *.pb.go, import path
                                  github.com/kv/kv/gen/go/... (the go_package of the proto files)

protoc is the pinned one of the venv (`python -m grpc_tools.protoc`, grpcio-tools in
constraints.txt), google/api/*.proto come from the pinned googleapis-common-protos, exactly as
for scripts/generate.py. The plugins are local executables: nothing is fetched. Install them with
scripts/install-polyglot-deps.sh.

    python scripts/generate_polyglot.py                # rewrite the generated files
    python scripts/generate_polyglot.py --check        # exit 1 and list the stale files
    python scripts/generate_polyglot.py --lang ts      # only one language (ts or go)
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import google.api
from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# google/api/*.proto ship inside googleapis-common-protos, next to its Python modules.
GOOGLEAPIS_INCLUDE = pathlib.Path(next(iter(google.api.__path__))).parent.parent

TS_ROOT = ROOT / "clients" / "typescript"
TS_PLUGIN = TS_ROOT / "node_modules" / ".bin" / "protoc-gen-es"
GO_ROOT = ROOT / "clients" / "go"
# The Go import path that clients/go stands for: the go_package of kv/v1/kv.proto is
# github.com/kv/kv/gen/go/kv/v1, so clients/go/kv/v1 holds that package.
GO_MODULE = "github.com/kv/kv/gen/go"

INSTALL_HINT = "run scripts/install-polyglot-deps.sh"


def proto_files() -> list[str]:
    return sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob("*.proto"))


def protoc(*args: str) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS_INCLUDE}", *args]
    subprocess.run(command, check=True, cwd=ROOT)


def descriptors(tmp: pathlib.Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """The contract's files and every file they import, in dependency order."""
    out = tmp / "descriptors.binpb"
    protoc("--include_imports", f"--descriptor_set_out={out}", *proto_files())
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return list(files.file)


def require(path: pathlib.Path | None, what: str) -> str:
    if path is None or not path.exists():
        sys.exit(f"scripts/generate_polyglot.py: {what} is missing; {INSTALL_HINT}")
    return str(path)


def generate_typescript(out: pathlib.Path, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    plugin = require(TS_PLUGIN, "clients/typescript/node_modules (npm ci)")
    # The well-known types (google/protobuf/*) come with @bufbuild/protobuf/wkt; every other
    # imported file (google/api/*) is generated next to the contract.
    targets = [f.name for f in files if not f.name.startswith("google/protobuf/")]
    protoc(
        f"--plugin=protoc-gen-es={plugin}",
        f"--es_out={out}",
        "--es_opt=target=ts,import_extension=js",
        *targets,
    )


def generate_go(out: pathlib.Path, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    go_plugin = shutil.which("protoc-gen-go")
    grpc_plugin = shutil.which("protoc-gen-go-grpc")
    require(pathlib.Path(go_plugin) if go_plugin else None, "protoc-gen-go (Debian package protoc-gen-go)")
    require(
        pathlib.Path(grpc_plugin) if grpc_plugin else None,
        "protoc-gen-go-grpc (Debian package protoc-gen-go-grpc)",
    )
    ours = set(proto_files())
    # A contract file without go_package gets one from its directory: kv/v2/x.proto becomes
    # github.com/kv/kv/gen/go/kv/v2, package kvv2. The imported google/api files keep theirs
    # (google.golang.org/genproto/...), which the Go code uses from Debian's genproto.
    mappings = []
    for file in files:
        if file.name in ours and not file.options.go_package:
            directory = str(pathlib.PurePosixPath(file.name).parent)
            package = "".join(directory.split("/")[-2:])
            mappings.append(f"M{file.name}={GO_MODULE}/{directory};{package}")
    options = ",".join([f"module={GO_MODULE}", *mappings])
    protoc(
        f"--plugin=protoc-gen-go={go_plugin}",
        f"--plugin=protoc-gen-go-grpc={grpc_plugin}",
        f"--go_out={out}",
        f"--go_opt={options}",
        f"--go-grpc_out={out}",
        f"--go-grpc_opt={options}",
        *sorted(ours),
    )


@dataclass(frozen=True)
class Target:
    name: str
    committed: pathlib.Path  # where the generated files are committed
    generate: Callable[[pathlib.Path, list[descriptor_pb2.FileDescriptorProto]], None]
    is_generated: Callable[[pathlib.Path], bool]  # relative path -> owned by the generator?


TARGETS = {
    "ts": Target("ts", TS_ROOT / "src" / "gen", generate_typescript, lambda _path: True),
    "go": Target("go", GO_ROOT, generate_go, lambda path: path.name.endswith(".pb.go")),
}


def generated_files(root: pathlib.Path, target: Target) -> set[pathlib.Path]:
    if not root.exists():
        return set()
    return {
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and target.is_generated(path.relative_to(root))
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report stale generated files")
    parser.add_argument("--lang", choices=sorted(TARGETS), action="append", help="default: all")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        files = descriptors(tmp)
        for name in args.lang or sorted(TARGETS):
            target = TARGETS[name]
            fresh_root = tmp / name
            fresh_root.mkdir()
            target.generate(fresh_root, files)
            fresh = generated_files(fresh_root, target)
            current = generated_files(target.committed, target)
            stale = sorted(
                str(path)
                for path in fresh | current
                if path not in fresh
                or path not in current
                or not filecmp.cmp(fresh_root / path, target.committed / path, shallow=False)
            )
            where = target.committed.relative_to(ROOT)
            if args.check:
                if stale:
                    failed = True
                    print(
                        f"Generated {name} code in {where} is stale; run `make generate-polyglot`. "
                        "Differences:",
                        *stale,
                        sep="\n  ",
                    )
                else:
                    print(f"Generated {name} code in {where} is up to date ({len(fresh)} files).")
                continue
            for path in current - fresh:
                (target.committed / path).unlink()
                for parent in (target.committed / path).parents:
                    if parent == target.committed or any(parent.iterdir()):
                        break
                    parent.rmdir()
            for path in fresh:
                destination = target.committed / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fresh_root / path, destination)
            print(f"Generated {len(fresh)} {name} files in {where}.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
