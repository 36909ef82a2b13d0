"""The scaleset command against a real server, and spec documents in Azure's property names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaleset import Region
from scaleset.cli import main
from scaleset.documents import spec_from_document
from scaleset.errors import InvalidInputError
from scaleset.testing.server import ServerThread

ARM = {
    "name": "web",
    "location": "westeurope",
    "sku": {"name": "Standard_D2s_v5", "capacity": 6},
    "zones": ["1", "2", "3"],
    "properties": {
        "orchestrationMode": "Flexible",
        "scaleInPolicy": {"rules": ["OldestVM"], "prioritizeUnhealthyVMs": True},
        "virtualMachineProfile": {
            "priority": "Spot",
            "evictionPolicy": "Delete",
            "billingProfile": {"maxPrice": -1},
            "networkProfile": {"networkInterfaceConfigurations": []},
        },
        "priorityMixPolicy": {"baseRegularPriorityCount": 2, "regularPriorityPercentageAboveBase": 50},
    },
}


def test_arm_documents_map_to_specs() -> None:
    spec, capacity, ignored = spec_from_document(ARM)
    assert capacity == 6
    assert spec.priority == "Spot" and spec.eviction_policy == "Delete" and spec.max_price == -1.0
    assert spec.scale_in_policy.rules == ("OldestVM",) and spec.scale_in_policy.prioritize_unhealthy_vms
    assert spec.priority_mix_policy is not None and spec.priority_mix_policy.base_regular_priority_count == 2
    assert ignored == ["location", "properties.virtual_machine_profile.network_profile"]


def test_flat_documents_in_either_case_and_unknown_properties() -> None:
    camel, _, _ = spec_from_document(
        {"name": "a", "platformFaultDomainCount": 1, "sku": {"name": "Standard_D2s_v5"}}
    )
    snake, _, _ = spec_from_document(
        {"name": "a", "platform_fault_domain_count": 1, "sku": {"name": "Standard_D2s_v5"}}
    )
    assert camel == snake and camel.platform_fault_domain_count == 1
    with pytest.raises(InvalidInputError) as err:
        spec_from_document({"name": "a", "colour": "blue"})
    assert "colour" in str(err.value)
    with pytest.raises(InvalidInputError):
        spec_from_document({"name": "a", "capacity": -1})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "cli.db"), Region(zones=["1", "2", "3"], fault_domains_per_zone=3)) as s:
        yield s


def run(server: ServerThread, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--server", server.target, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = tmp_path / "web.json"
    doc.write_text(json.dumps(ARM))
    code, out, err = run(server, capsys, "create", "-f", str(doc))
    assert code == 0 and "created web (revision 1)" in out and "0 -> 6 instances" in out
    assert "ignored ARM property properties.virtual_machine_profile.network_profile" in err

    code, out, _ = run(server, capsys, "show", "web")
    lines = out.splitlines()
    assert lines[0].startswith("web  Flexible  capacity 6  revision 1")
    assert lines[1].split() == ["FD0", "FD1", "FD2", "total"]
    assert lines[2].split() == ["zone", "1", "1", "1", "0", "2"]
    assert "priority: Regular 4, Spot 2" in out

    code, out, _ = run(server, capsys, "scale", "web", "3", "--dry-run")
    assert code == 0 and "6 -> 3 instances (dry run)" in out and "scale-in (OldestVM)" in out
    code, out, _ = run(server, capsys, "scale", "web", "9")
    assert "(applied): 3 to create" in out

    code, out, _ = run(server, capsys, "list")
    assert out.splitlines()[1].split() == ["web", "Flexible", "1,2,3", "9", "2"]

    code, out, _ = run(server, capsys, "protect", "web", "0", "1", "--scale-set-actions")
    assert "protection from scale-in and scale-set actions for 2 instances" in out
    code, out, _ = run(server, capsys, "evict", "web", "4")
    assert "deleted: [4]" in out

    code, out, _ = run(server, capsys, "region", "zone", "2", "down")
    assert "2 (down)" in out
    code, out, _ = run(
        server, capsys, "region", "pool", "1", "Standard_D2s_v5", "Spot", "5", "--price", "0.01"
    )
    assert "pool 1/Standard_D2s_v5/Spot: available 5, price 0.01" in out

    code, out, _ = run(server, capsys, "watch", "--count", "4")
    assert [line.split()[2] for line in out.splitlines()] == ["r1", "r2", "r3", "r4"]

    code, out, _ = run(server, capsys, "show", "web", "-o", "json")
    shown = json.loads(out)
    assert shown["capacity"] == 8 and shown["instances"][0]["protect_from_scale_set_actions"] is True


def test_cli_errors_exit_2_with_the_code(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(server, capsys, "scale", "missing", "3")
    assert code == 2 and err.startswith("error [ResourceNotFound]: scale set 'missing' does not exist.")
    code, _, err = run(server, capsys, "create", "-f", "/no/such/file.yaml")
    assert code == 2 and "No such file" in err


def test_cli_rebalance(server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = tmp_path / "web.yaml"
    doc.write_text("name: web\nzones: ['1', '2', '3']\nsku: {name: Standard_D2s_v5}\n")
    run(server, capsys, "region", "zone", "1", "down")
    run(server, capsys, "create", "-f", str(doc), "--capacity", "6")
    run(server, capsys, "region", "zone", "1", "up")
    code, out, _ = run(server, capsys, "rebalance", "web")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("web: OPTIMAL, 2 replacements in 2 waves (max surge 1)") and lines[0].endswith(
        "(dry run)"
    )
    assert "zones 4 -> 0" in lines[1]
    assert lines[2].startswith("stages: violation 0 OPTIMAL in ") and "price " in lines[2]
    zone1 = lines[4].split()
    assert (
        zone1[:2] == ["zone", "1"] and zone1[-1] == "0->2" and sorted(zone1[2:5]) == ["0->0", "0->1", "0->1"]
    )
    assert (
        "wave 2:" in out and "create zone 1 fd" in out and "rebalance: replaced; healthy and current" in out
    )
    code, out, _ = run(server, capsys, "rebalance", "web", "--apply", "--max-surge", "2")
    assert "in 1 waves (max surge 2)" in out and "(applied)" in out and "(id 6)" in out
    code, out, _ = run(server, capsys, "show", "web")
    assert out.splitlines()[2].split()[-1] == "2"


def test_cli_upgrade(server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = tmp_path / "web.yaml"
    doc.write_text(
        "name: web\nzones: ['1']\nsku: {name: Standard_D2s_v5, capacity: 5}\nupgradePolicy: {mode: Manual}\n"
    )
    run(server, capsys, "create", "-f", str(doc))
    code, out, _ = run(server, capsys, "upgrade", "status", "web")
    assert out.strip() == "web: no rolling upgrade has run"
    doc.write_text("name: web\nzones: ['1']\nsku: {name: Standard_D4s_v5}\n")
    from scaleset.client import Client
    from scaleset.documents import load_document, spec_from_document

    with Client(server.target) as client:
        client.update_scale_set(spec_from_document(load_document(str(doc)))[0])
        client.report_health("web", range(5), "Healthy")
    code, out, _ = run(server, capsys, "upgrade", "start", "web")
    lines = out.splitlines()
    assert lines[0] == "web: rolling upgrade to model 2: RollingForward"
    assert lines[1] == "batches: 0 of 5 done, 5 left" and "5 pending" in lines[2]
    code, out, _ = run(server, capsys, "upgrade", "cancel", "web")
    assert "Cancelled" in out.splitlines()[0]
    code, _, err = run(server, capsys, "upgrade", "cancel", "web")
    assert code == 2 and "[NoRollingUpgradeInProgress]" in err


def test_serve_cluster_refuses_what_it_cannot_do(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--cluster", "--db", str(tmp_path / "x.db"), "--metrics-port", "0"]) == 2
    assert "--cluster needs --store postgresql://" in capsys.readouterr().err
    url = "postgresql://nobody@127.0.0.1:1/none"
    assert main(["serve", "--cluster", "--standby", "--store", url, "--metrics-port", "0"]) == 2
    assert "--standby has no use with --cluster" in capsys.readouterr().err
    assert main(["serve", "--cluster", "--partitions", "0", "--store", url, "--metrics-port", "0"]) == 2
    assert "--partitions must be between 1 and 256" in capsys.readouterr().err


def test_serve_refuses_bounds_that_would_let_nothing_through(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = str(tmp_path / "x.db")
    assert main(["serve", "--db", db, "--metrics-port", "0", "--stream-send-timeout", "0"]) == 2
    assert "--stream-send-timeout must be above 0 seconds, got 0." in capsys.readouterr().err
    assert main(["serve", "--db", db, "--metrics-port", "0", "--max-connections", "0"]) == 2
    assert "--max-connections must be at least 1, got 0." in capsys.readouterr().err
