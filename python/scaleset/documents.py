"""Scale-set specs from YAML or JSON documents, in Azure's property names.

Three shapes are accepted: our own snake_case (``orchestration_mode``), Azure's camelCase
(``orchestrationMode``), or an ARM resource (``{"name", "sku": {"name", "capacity"}, "zones",
"properties": {...}}``). In an ARM resource, properties scaleset does not model (network profiles,
extensions, ...) are ignored and reported; in the flat shapes an unknown property is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from scaleset.errors import invalid_input
from scaleset.model import AutoscaleSetting, ScaleSetSpec

__all__ = ["autoscale_from_document", "load_document", "spec_from_document"]

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


def snake(key: str) -> str:
    return _CAMEL.sub(r"\1_\2", key).lower()


def _snake_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {snake(str(k)): _snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    return value


def load_document(path: str) -> Any:
    """Parses a YAML or JSON file (JSON is YAML)."""
    text = Path(path).read_text() if path != "-" else __import__("sys").stdin.read()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise invalid_input(f"{path} is neither valid YAML nor JSON: {e}") from None


def spec_from_document(doc: Any) -> tuple[ScaleSetSpec, int | None, list[str]]:
    """Returns the spec, the capacity if the document gives one (``capacity`` or ARM's
    ``sku.capacity``), and the ARM properties that were ignored."""
    if not isinstance(doc, Mapping):
        raise invalid_input("a scale-set document must be a mapping of property names to values.")
    data = _snake_keys(doc)
    ignored: list[str] = []
    if "properties" in data:
        data = _flatten_arm(data, ignored)
    capacity = data.pop("capacity", None)
    sku = data.get("sku")
    if isinstance(sku, Mapping) and "capacity" in sku:
        sku = dict(sku)
        capacity = sku.pop("capacity")
        data["sku"] = sku
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise invalid_input(f"capacity must be a non-negative integer, got {capacity!r}.")
    return ScaleSetSpec.from_dict(data), capacity, ignored


_ARM_TOP = {"name", "sku", "zones", "capacity"}
_ARM_PROPERTIES = {
    "orchestration_mode",
    "platform_fault_domain_count",
    "single_placement_group",
    "zone_balance",
    "scale_in_policy",
    "priority_mix_policy",
    "sku_profile",
    "upgrade_policy",
    "automatic_repairs_policy",
    "spot_restore_policy",
    "placement",
    "overprovision",
    "do_not_run_extensions_on_overprovisioned_vms",
}


def _flatten_arm(data: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    flat = {k: v for k, v in data.items() if k in _ARM_TOP}
    ignored.extend(k for k in data if k not in _ARM_TOP and k != "properties")
    props = data["properties"] or {}
    for key, value in props.items():
        if key in _ARM_PROPERTIES:
            flat[key] = value
        elif key == "resiliency_policy" and isinstance(value, Mapping):
            for rp_key, rp_value in value.items():
                if rp_key in ("automatic_zone_rebalancing_policy", "zone_allocation_policy"):
                    flat[rp_key] = rp_value
                else:
                    ignored.append(f"properties.resiliency_policy.{rp_key}")
        elif key == "virtual_machine_profile":
            for vm_key, vm_value in (value or {}).items():
                if vm_key in ("priority", "eviction_policy"):
                    flat[vm_key] = vm_value
                elif (
                    vm_key == "billing_profile" and isinstance(vm_value, Mapping) and "max_price" in vm_value
                ):
                    flat["max_price"] = vm_value["max_price"]
                else:
                    ignored.append(f"properties.virtual_machine_profile.{vm_key}")
        else:
            ignored.append(f"properties.{key}")
    return flat


# ----- autoscale settings -------------------------------------------------------------------------------

#: Azure properties of an autoscale setting that scaleset reads; the others are reported as ignored.
_AUTOSCALE = {
    "setting": {"profiles", "enabled", "predictive_autoscale_policy"},
    "profile": {"name", "capacity", "rules", "fixed_date", "recurrence"},
    "metric_trigger": {
        "metric_name",
        "operator",
        "threshold",
        "time_grain",
        "statistic",
        "time_window",
        "time_aggregation",
        "divide_per_instance",
        "query",
    },
}
#: Numbers Azure's SDK serialises as strings ("capacity": {"minimum": "1"}, "scaleAction": {"value": "1"}).
_NUMERIC = {"minimum", "maximum", "default", "value"}


def autoscale_from_document(doc: Any) -> tuple[AutoscaleSetting, list[str]]:
    """An autoscale setting from Azure's shape (camelCase or snake_case, or a whole ARM
    ``Microsoft.Insights/autoscaleSettings`` resource as Azure's SDK serialises it). Returns the setting
    and the Azure properties scaleset does not model (notifications, metric namespaces, dimensions ...)."""
    if not isinstance(doc, Mapping):
        raise invalid_input("an autoscale document must be a mapping of property names to values.")
    data = _snake_keys(doc)
    ignored: list[str] = []
    if "properties" in data:
        ignored.extend(k for k in data if k != "properties")
        data = dict(data["properties"] or {})
    data = _keep(data, _AUTOSCALE["setting"], "", ignored)
    profiles = []
    for k, profile in enumerate(data.get("profiles") or []):
        where = f"profiles[{k}]"
        profile = _keep(dict(profile), _AUTOSCALE["profile"], where, ignored)
        profile["capacity"] = {key: _number(v) for key, v in (profile.get("capacity") or {}).items()}
        rules = []
        for j, rule in enumerate(profile.get("rules") or []):
            rule = dict(rule)
            trigger = _keep(
                dict(rule.get("metric_trigger") or {}),
                _AUTOSCALE["metric_trigger"],
                f"{where}.rules[{j}].metric_trigger",
                ignored,
            )
            action = {
                key: _number(v) if key in _NUMERIC else v
                for key, v in (rule.get("scale_action") or {}).items()
            }
            rules.append({"metric_trigger": trigger, "scale_action": action})
        profile["rules"] = rules
        profiles.append(profile)
    data["profiles"] = profiles
    return AutoscaleSetting.from_dict(data), ignored


def _keep(data: dict[str, Any], known: set[str], where: str, ignored: list[str]) -> dict[str, Any]:
    ignored.extend(f"{where}.{k}" if where else k for k in data if k not in known)
    return {k: v for k, v in data.items() if k in known}


def _number(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value
