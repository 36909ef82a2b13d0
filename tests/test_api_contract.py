"""The proto is the contract: buf lint passes, and buf breaking (against the committed v1 image) catches a
breaking change, so one cannot land by accident (the test command runs both on the real file too)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = shutil.which("buf")  # from buf-bin, a test extra (pip install '.[test]')


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert BUF is not None, "buf is missing: pip install '.[test]' installs buf-bin"
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def copy_of_the_module(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path / "proto" / "scaleset" / "v1" / "scaleset.proto"


def test_the_committed_contract_lints_and_matches(tmp_path: Path) -> None:
    copy_of_the_module(tmp_path)
    assert buf("lint", cwd=tmp_path).returncode == 0
    assert buf("breaking", "--against", str(ROOT / "api" / "scaleset-v1.binpb"), cwd=tmp_path).returncode == 0


def test_a_breaking_change_fails_the_gate(tmp_path: Path) -> None:
    proto = copy_of_the_module(tmp_path)
    text = proto.read_text()
    assert "  uint64 capacity = 2;\n" in text
    proto.write_text(text.replace("  uint64 capacity = 2;\n", "  string capacity = 2;\n", 1))
    result = buf("breaking", "--against", str(ROOT / "api" / "scaleset-v1.binpb"), cwd=tmp_path)
    assert result.returncode != 0 and "capacity" in result.stdout


def test_an_additive_change_passes_the_gate(tmp_path: Path) -> None:
    proto = copy_of_the_module(tmp_path)
    proto.write_text(
        proto.read_text() + "\n// A new message is not breaking.\nmessage Added {\n  string note = 1;\n}\n"
    )
    assert buf("breaking", "--against", str(ROOT / "api" / "scaleset-v1.binpb"), cwd=tmp_path).returncode == 0
