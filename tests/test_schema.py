"""One schema: the Python model (scaleset.model) declares every spec field and its default; the proto and
the Rust core must agree with it. Adding a field fails here until every representation has it."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from scaleset import (
    AutomaticRepairsPolicy,
    AutomaticZoneRebalancingPolicy,
    Engine,
    PriorityMixPolicy,
    Region,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    VmSize,
    model,
)
from scaleset.convert import spec_from_proto, spec_to_proto
from scaleset.v1 import scaleset_pb2 as pb

MESSAGES = [
    (model.ScaleSetSpec, pb.ScaleSetSpec),
    (model.Sku, pb.Sku),
    (model.SkuProfile, pb.SkuProfile),
    (model.VmSize, pb.VmSize),
    (model.PriorityMixPolicy, pb.PriorityMixPolicy),
    (model.ScaleInPolicy, pb.ScaleInPolicy),
    (model.AutomaticZoneRebalancingPolicy, pb.AutomaticZoneRebalancingPolicy),
    (model.UpgradePolicy, pb.UpgradePolicy),
    (model.RollingUpgradePolicy, pb.RollingUpgradePolicy),
    (model.AutomaticRepairsPolicy, pb.AutomaticRepairsPolicy),
    (model.AutoscaleSetting, pb.AutoscaleSetting),
    (model.AutoscaleProfile, pb.AutoscaleProfile),
    (model.AutoscaleCapacity, pb.AutoscaleCapacity),
    (model.ScaleRule, pb.ScaleRule),
    (model.MetricTrigger, pb.MetricTrigger),
    (model.ScaleAction, pb.ScaleAction),
    (model.TimeWindow, pb.TimeWindow),
    (model.Recurrence, pb.Recurrence),
    (model.RecurrentSchedule, pb.RecurrentSchedule),
    (model.PredictiveAutoscalePolicy, pb.PredictiveAutoscalePolicy),
    (model.Placement, pb.Placement),
    (model.ZoneAllocationPolicy, pb.ZoneAllocationPolicy),
    (model.MaxInstancePercentPerZonePolicy, pb.MaxInstancePercentPerZonePolicy),
]


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "message"), MESSAGES, ids=[c.__name__ for c, _ in MESSAGES])
def test_proto_fields_are_the_model_fields(cls: type, message: Any) -> None:
    assert sorted(message.DESCRIPTOR.fields_by_name) == sorted(field_names(cls))


@pytest.mark.parametrize(("cls", "message"), MESSAGES, ids=[c.__name__ for c, _ in MESSAGES])
def test_optional_model_fields_have_presence_in_proto(cls: type, message: Any) -> None:
    """A field that may be None in Python is one the proto can leave unset (optional or a message)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is None:
            fd = message.DESCRIPTOR.fields_by_name[f.name]
            assert fd.has_presence, f"{cls.__name__}.{f.name} may be None but the proto cannot leave it unset"
            assert type(None) in typing.get_args(hints[f.name])


def full_spec() -> ScaleSetSpec:
    """Every optional part set, so every nested object crosses the boundary."""
    return ScaleSetSpec(
        name="web",
        zones=["1", "2"],
        sku=Sku(name="Mix"),
        sku_profile=SkuProfile(
            vm_sizes=[VmSize("Standard_D2s_v5", rank=0), VmSize("Standard_D4s_v5", rank=1)],
            allocation_strategy="Prioritized",
        ),
        priority="Spot",
        eviction_policy="Delete",
        max_price=0.5,
        priority_mix_policy=PriorityMixPolicy(2, 50),
        automatic_zone_rebalancing_policy=AutomaticZoneRebalancingPolicy(enabled=True),
        automatic_repairs_policy=AutomaticRepairsPolicy(enabled=True),
        platform_fault_domain_count=1,
        single_placement_group=False,
    )


def keys(value: Any) -> Any:
    """The nested key structure of plain data (lists reduced to their first item's keys)."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [keys(value[0])]
    return None


def test_the_rust_model_has_the_same_fields() -> None:
    engine = Engine(Region(zones=["1", "2"]))
    engine.create_scale_set(full_spec())
    stored = engine._core.get_spec("web")  # the Rust model, serialised field by field by the binding
    assert keys(stored) == keys(full_spec().to_dict())


def test_defaults_agree_between_python_proto_and_rust() -> None:
    minimal = ScaleSetSpec(name="web", zones=["1"], sku=Sku(name="Standard_D2s_v5"))
    # The proto's unset fields mean the model's defaults (nothing is restated in the conversion).
    assert (
        spec_from_proto(pb.ScaleSetSpec(name="web", zones=["1"], sku=pb.Sku(name="Standard_D2s_v5")))
        == minimal
    )
    assert spec_from_proto(spec_to_proto(full_spec())) == full_spec()
    # The core fills Azure's defaults where Python leaves None; everything Python defaults, it keeps.
    engine = Engine(Region(zones=["1"]))
    engine.create_scale_set(minimal)
    stored = engine.get_spec("web").to_dict()
    for name, value in minimal.to_dict().items():
        if value is not None and name != "model_version":
            assert stored[name] == value, name


def test_autoscale_settings_round_trip_and_unset_fields_take_the_defaults() -> None:
    from scaleset import (
        AutoscaleCapacity,
        AutoscaleProfile,
        AutoscaleSetting,
        MetricTrigger,
        PredictiveAutoscalePolicy,
        Recurrence,
        RecurrentSchedule,
        ScaleAction,
        ScaleRule,
        TimeWindow,
    )
    from scaleset.convert import autoscale_setting_from_proto, autoscale_setting_to_proto

    full = AutoscaleSetting(
        [
            AutoscaleProfile(
                "default",
                AutoscaleCapacity(1, 5, 2),
                [
                    ScaleRule(
                        MetricTrigger("cpu", "GreaterThan", 70.0, query="avg(cpu)"),
                        ScaleAction("Increase", value=2),
                    ),
                ],
            ),
            AutoscaleProfile(
                "weekday",
                AutoscaleCapacity(2, 5, 2),
                recurrence=Recurrence(RecurrentSchedule("UTC", ["Monday"], [8], [0])),
            ),
            AutoscaleProfile(
                "launch",
                AutoscaleCapacity(3, 5, 3),
                fixed_date=TimeWindow("2027-01-01T00:00", "2027-01-02T00:00"),
            ),
        ],
        enabled=False,
        predictive_autoscale_policy=PredictiveAutoscalePolicy("Enabled", "PT10M"),
    )
    assert autoscale_setting_from_proto(autoscale_setting_to_proto(full)) == full
    minimal = pb.AutoscaleSetting(
        profiles=[
            pb.AutoscaleProfile(
                name="p",
                capacity=pb.AutoscaleCapacity(minimum=1, maximum=2, default=1),
                rules=[
                    pb.ScaleRule(
                        metric_trigger=pb.MetricTrigger(
                            metric_name="cpu", operator=pb.COMPARISON_OPERATOR_LESS_THAN, threshold=5
                        ),
                        scale_action=pb.ScaleAction(direction=pb.SCALE_DIRECTION_DECREASE),
                    )
                ],
            )
        ]
    )
    expected = AutoscaleSetting(
        [
            AutoscaleProfile(
                "p",
                AutoscaleCapacity(1, 2, 1),
                [
                    ScaleRule(MetricTrigger("cpu", "LessThan", 5.0), ScaleAction("Decrease")),
                ],
            )
        ]
    )
    assert autoscale_setting_from_proto(minimal) == expected


def test_every_enum_on_the_wire_carries_exactly_the_cores_words() -> None:
    """A closed set is an enum in the proto and Azure's words in Python and Rust; the words derived from
    the enum value names (SCALE_IN_RULE_NEWEST_VM -> NewestVM) must be exactly the core's spellings."""
    import re
    from pathlib import Path

    from scaleset.convert import _enum_words

    src = Path(__file__).resolve().parent.parent / "rust/scaleset-core/src"
    source = (src / "model.rs").read_text() + (src / "autoscale.rs").read_text()
    core = {
        field.rsplit(".", 1)[-1]: set(re.findall(r'= "([^"]+)"', values))
        for field, values in re.findall(r'(?:azure_enum|names)!\([^"]*"([^"]+)"[^{]*\{([^}]*)\}', source)
    }
    from scaleset.policies.autoscale import DAYS

    core["days"] = set(DAYS)  # checked in Python, not in the core
    checked = set()
    for cls, message in MESSAGES:
        for fd in message.DESCRIPTOR.fields:
            if fd.enum_type is None or fd.name not in core:
                continue
            words = set(_enum_words(fd.enum_type)[1].values())
            assert words == core[fd.name], (cls.__name__, fd.name)
            checked.add(fd.name)
    # The spec's closed sets; the single-valued ones (Auto, Recreate, CreateBeforeDelete) are strings in Rust.
    assert {
        "orchestration_mode",
        "priority",
        "eviction_policy",
        "allocation_strategy",
        "rules",
        "image_kind",
    } <= checked
    assert {"mode", "repair_action"} <= checked
    assert {"operator", "statistic", "time_aggregation", "direction", "type", "days"} <= checked


def test_an_enum_value_unknown_to_this_server_is_invalid_input_naming_the_field() -> None:
    from scaleset.errors import InvalidInputError

    msg = spec_to_proto(ScaleSetSpec(name="web", sku=Sku(name="Standard_D2s_v5")))
    msg.scale_in_policy.rules.append(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError) as caught:
        spec_from_proto(msg)
    assert caught.value.field == "rules" and "NewestVM" in str(caught.value)
    assert spec_from_proto(
        spec_to_proto(ScaleSetSpec(name="web", scale_in_policy=model.ScaleInPolicy(["newestvm"])))
    ).scale_in_policy.rules == ("NewestVM",)
