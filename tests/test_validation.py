"""Validation with Azure's error codes (reference §1, §2.4, §5, §6, §12)."""

from __future__ import annotations

import pytest
from scaleset import (
    Engine,
    Instance,
    PriorityMixPolicy,
    Region,
    ScaleInPolicy,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    VmSize,
)
from scaleset.errors import CapacityError, ConflictError, InvalidInputError, NotFoundError, ScaleSetError
from scaleset.v1 import scaleset_pb2 as pb

from tests.conftest import SIZE, zonal_spec

MIX = SkuProfile(vm_sizes=[VmSize("Standard_D2s_v5"), VmSize("Standard_D4s_v5")])

INVALID = [
    (zonal_spec(name="bad name!"), "InvalidResourceName"),
    (zonal_spec(zones=["1"], zone_balance=True), "ZoneBalanceRequiresMultipleZones"),
    (zonal_spec(zones=[], zone_balance=True), "ZoneBalanceRequiresMultipleZones"),
    (zonal_spec(zones=["9"]), "InvalidParameter"),
    (zonal_spec(zones=["1", "1"]), "InvalidParameter"),
    (zonal_spec(platform_fault_domain_count=2), "InvalidPlatformFaultDomainCount"),  # Flexible zonal: 1 only
    (
        zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=3),
        "InvalidPlatformFaultDomainCount",
    ),
    (
        zonal_spec(zones=[], platform_fault_domain_count=4),
        "InvalidPlatformFaultDomainCount",
    ),  # Flexible regional: 1-3
    (zonal_spec(orchestration_mode="Sideways"), "InvalidParameter"),
    (zonal_spec(priority="Cheap"), "InvalidParameter"),
    (zonal_spec(sku=None), "InvalidParameter"),
    (zonal_spec(eviction_policy="Delete"), "EvictionPolicyCanBeSetOnlyOnAzureSpotVirtualMachines"),
    (zonal_spec(max_price=0.5), "MaxPriceIsSupportedOnlyForAzureSpotVirtualMachines"),
    (zonal_spec(priority="Spot", max_price=0.0), "MaxPriceValueInvalid"),
    (zonal_spec(priority="Spot", max_price=-2.0), "MaxPriceValueInvalid"),
    (zonal_spec(priority_mix_policy=PriorityMixPolicy(2, 50)), "PriorityMixPolicyNotSupported"),
    (
        zonal_spec(
            orchestration_mode="Uniform", priority="Spot", priority_mix_policy=PriorityMixPolicy(2, 50)
        ),
        "PriorityMixPolicyNotSupported",
    ),
    (zonal_spec(priority="Spot", priority_mix_policy=PriorityMixPolicy(2, 101)), "InvalidParameter"),
    (
        zonal_spec(sku=Sku(name="Mix"), sku_profile=SkuProfile(vm_sizes=[])),
        "SkuProfileVMSizesCannotBeNullOrEmpty",
    ),
    (
        zonal_spec(sku=None, sku_profile=SkuProfile(vm_sizes=[f"Standard_D{i}s_v5" for i in range(6)])),
        "SkuProfileHasTooManyVMSizesInRequest",
    ),
    (
        zonal_spec(sku=None, sku_profile=SkuProfile(vm_sizes=["Standard_D2s_v5", "standard_d2s_v5"])),
        "SkuProfileVMSizesCannotHaveDuplicates",
    ),
    (
        zonal_spec(sku=None, sku_profile=SkuProfile(vm_sizes=["A"], allocation_strategy="Cheapest")),
        "SkuProfileAllocationStrategyInvalid",
    ),
    (zonal_spec(sku=Sku(name=SIZE), sku_profile=MIX), "SkuNameMustBeMixIfSkuProfileIsSpecified"),
    (
        zonal_spec(sku=Sku(name="Mix", tier="Standard"), sku_profile=MIX),
        "SkuTierMustNotBeSetIfSkuProfileIsSpecified",
    ),
    (zonal_spec(orchestration_mode="Uniform", sku=None, sku_profile=MIX), "SkuProfileScenarioNotSupported"),
    (zonal_spec(sku=None, sku_profile=SkuProfile(vm_sizes=[VmSize("A", rank=0)])), "SkuProfileRankInvalid"),
    (zonal_spec(scale_in_policy=ScaleInPolicy(rules=["Random"])), "InvalidParameter"),
]


@pytest.mark.parametrize(("spec", "code"), INVALID, ids=[code for _, code in INVALID])
def test_invalid_specs_are_rejected_with_azure_codes(engine: Engine, spec: ScaleSetSpec, code: str) -> None:
    with pytest.raises(ScaleSetError) as err:
        engine.create_scale_set(spec)
    assert err.value.code == code
    assert str(err.value)  # a message a person can act on
    assert names_a_spec_field(err.value.field)  # the field at fault, as its path in the API
    assert engine.list_scale_sets() == []


def names_a_spec_field(path: str | None) -> bool:
    message = pb.ScaleSetSpec.DESCRIPTOR
    for part in (path or "").split("."):
        field = message.fields_by_name.get(part) if message is not None else None
        if field is None:
            return False
        message = field.message_type
    return True


def test_defaults_follow_azures_table(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec("flex-zonal"))
    engine.create_scale_set(zonal_spec("flex-regional", zones=[]))
    engine.create_scale_set(zonal_spec("uni-zonal", orchestration_mode="Uniform"))
    engine.create_scale_set(zonal_spec("uni-regional", orchestration_mode="Uniform", zones=[]))
    got = {
        s.name: (s.platform_fault_domain_count, s.single_placement_group) for s in engine.list_scale_sets()
    }
    assert got == {
        "flex-regional": (1, False),
        "flex-zonal": (1, False),
        "uni-regional": (5, True),
        "uni-zonal": (1, False),
    }


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        (zonal_spec(), 1000),
        (zonal_spec(image_kind="ManagedImage"), 600),
        (zonal_spec(orchestration_mode="Uniform", zones=[]), 100),  # single placement group by default
        (zonal_spec(zones=[], platform_fault_domain_count=2, sku=Sku(name="Standard_L8s_v3")), 200),
        (zonal_spec(zones=[], platform_fault_domain_count=2), 1000),  # D-series: memory-preserving updates
    ],
)
def test_instance_limits(engine: Engine, spec: ScaleSetSpec, limit: int) -> None:
    engine.create_scale_set(spec)
    assert engine.instance_limit(spec.name) == limit
    with pytest.raises(CapacityError) as err:
        engine.set_capacity(spec.name, limit + 1)
    assert err.value.code == "OperationNotAllowed"
    assert f"'{limit}'" in str(err.value)


def test_instance_limit_override_for_private_fleets(region: Region) -> None:
    engine = Engine(region, instance_limit=100_000)
    engine.create_scale_set(zonal_spec(), capacity=5000)
    assert engine.capacity("web") == 5000


def test_immutable_properties(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=5))
    changes = [
        (zonal_spec(orchestration_mode="Flexible"), "orchestrationMode"),
        (zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=1), "platformFaultDomainCount"),
        (zonal_spec(orchestration_mode="Uniform", zones=["1", "2"]), "zones"),
        (zonal_spec(orchestration_mode="Uniform", priority="Spot"), "priority"),
    ]
    for spec, prop in changes:
        with pytest.raises(ConflictError) as err:
            engine.update_scale_set(spec)
        assert err.value.code == "PropertyChangeNotAllowed"
        assert f"'{prop}'" in str(err.value)
    assert engine.get_spec("web").orchestration_mode == "Uniform"


def test_update_bumps_the_model_version_only_when_the_model_changes(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=2)
    assert engine.get_spec("web").model_version == 1
    same = engine.update_scale_set(zonal_spec(scale_in_policy=ScaleInPolicy(rules=["OldestVM"])))
    assert same.model_version == 1 and same.scale_in_policy.rules == ("OldestVM",)
    bumped = engine.update_scale_set(zonal_spec(sku=Sku(name="Standard_D4s_v5")))
    assert bumped.model_version == 2
    engine.set_capacity("web", 3)
    versions = [(i.vm_size, i.model_version) for i in engine.get_scale_set("web").instances]
    assert versions == [(SIZE, 1), (SIZE, 1), ("Standard_D4s_v5", 2)]


def test_zones_can_be_added_and_single_placement_group_turned_off(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(zones=["1", "2"]))
    assert engine.update_scale_set(zonal_spec(zones=["1", "2", "3"])).zones == ("1", "2", "3")
    engine.create_scale_set(zonal_spec("u", orchestration_mode="Uniform", zones=[]))
    assert (
        engine.update_scale_set(
            zonal_spec("u", orchestration_mode="Uniform", zones=[], single_placement_group=False)
        ).single_placement_group
        is False
    )
    with pytest.raises(ConflictError):
        engine.update_scale_set(
            zonal_spec("u", orchestration_mode="Uniform", zones=[], single_placement_group=True)
        )


def test_not_found_and_duplicates(engine: Engine) -> None:
    with pytest.raises(NotFoundError) as err:
        engine.set_capacity("nope", 1)
    assert err.value.code == "ResourceNotFound"
    engine.create_scale_set(zonal_spec(), capacity=2)
    with pytest.raises(ConflictError) as err2:
        engine.create_scale_set(zonal_spec())
    assert err2.value.code == "ScaleSetAlreadyExists"
    with pytest.raises(NotFoundError) as err3:
        engine.delete_instances("web", [0, 77])
    assert err3.value.code == "InstanceNotFound" and "77" in str(err3.value)
    assert engine.capacity("web") == 2
    with pytest.raises(InvalidInputError):
        engine.delete_instances("web", [0, 0])
    with pytest.raises(NotFoundError) as err4:
        engine.set_zone_available("7", False)
    assert err4.value.code == "ZoneNotFound"


@pytest.mark.parametrize(
    "instance",
    [
        Instance(instance_id=1, zone="9", vm_size=SIZE),
        Instance(instance_id=1, zone="1", fault_domain=5, vm_size=SIZE),
        Instance(instance_id=1, zone="1", vm_size="Standard_X1"),
        Instance(instance_id=1, zone="1", vm_size=SIZE, priority="Spot"),
        Instance(instance_id=1, zone="1", vm_size=SIZE, health="Sick"),
        Instance(instance_id=1, zone="1", vm_size=SIZE, protect_from_scale_set_actions=True),
        Instance(instance_id=2**53, zone="1", vm_size=SIZE),
    ],
)
def test_import_validation(engine: Engine, instance: Instance) -> None:
    engine.create_scale_set(zonal_spec())
    with pytest.raises(InvalidInputError) as err:
        engine.import_instances("web", [instance])
    assert err.value.field is not None
    assert engine.capacity("web") == 0


def test_python_side_arguments_get_codes_too(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec())
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(InvalidInputError) as err:
            engine.set_capacity("web", bad)  # type: ignore[arg-type]
        assert err.value.code == "InvalidParameter"
    with pytest.raises(InvalidInputError):
        Instance(instance_id=-3)
    with pytest.raises(InvalidInputError):
        ScaleSetSpec.from_dict({"name": "x", "colour": "red"})
