"""In-tree PEP 517 backend: generates the gRPC modules from proto/, then hands over to maturin.

The generated files live in python/scaleset/v1/ (gitignored) and are listed in [tool.maturin] include.
grpc_tools.protoc is used rather than any system protoc, so the generated code always matches the pinned
protobuf runtime.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import maturin

_ROOT = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    protos = sorted(glob.glob(os.path.join(_ROOT, "proto", "scaleset", "v1", "*.proto")))
    if not protos:
        return
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{os.path.join(_ROOT, 'proto')}",
        f"-I{include}",
        f"--python_out={os.path.join(_ROOT, 'python')}",
        f"--pyi_out={os.path.join(_ROOT, 'python')}",
        f"--grpc_python_out={os.path.join(_ROOT, 'python')}",
        # With its comments, for server reflection (the generated modules carry none).
        f"--descriptor_set_out={os.path.join(_ROOT, 'python', 'scaleset', 'v1', 'scaleset.binpb')}",
        "--include_source_info",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed for {protos}")


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return maturin.get_requires_for_build_wheel(config_settings)  # type: ignore[no-any-return]


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    return maturin.get_requires_for_build_sdist(config_settings)  # type: ignore[no-any-return]


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return maturin.get_requires_for_build_editable(config_settings)  # type: ignore[no-any-return]


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    return maturin.prepare_metadata_for_build_wheel(metadata_directory, config_settings)  # type: ignore[no-any-return]


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    return maturin.prepare_metadata_for_build_editable(metadata_directory, config_settings)  # type: ignore[no-any-return]


def build_wheel(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    generate_protos()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)  # type: ignore[no-any-return]


def build_editable(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    generate_protos()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)  # type: ignore[no-any-return]


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    generate_protos()
    return maturin.build_sdist(sdist_directory, config_settings)  # type: ignore[no-any-return]
