"""The pinned stack imports together: generated protobuf/gRPC stubs beside OR-Tools' CP-SAT."""

from __future__ import annotations


def test_generated_stubs_and_ortools_import_in_one_process() -> None:
    import google.protobuf
    from ortools.sat.python import cp_model
    from scaleset.v1 import scaleset_pb2, scaleset_pb2_grpc

    assert google.protobuf.__version__.startswith("6.33.")
    spec = scaleset_pb2.ScaleSetSpec(name="web", zones=["1", "2"])
    assert scaleset_pb2.ScaleSetSpec.FromString(spec.SerializeToString()) == spec
    assert hasattr(scaleset_pb2_grpc, "ScaleSetsStub")
    model = cp_model.CpModel()
    x = model.new_int_var(0, 10, "x")
    model.add(x >= 3)
    model.minimize(x)
    solver = cp_model.CpSolver()
    assert solver.solve(model) == cp_model.OPTIMAL
    assert solver.value(x) == 3
