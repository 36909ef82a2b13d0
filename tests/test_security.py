"""Safe to expose (issue 13): TLS and mutual TLS from files (reloaded when they change), bearer tokens
(static and JWT) with roles enforced in one place, an audit trail, and no plain listening beyond localhost."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scaleset import Region
from scaleset.auth import Authenticator, required_role, server_credentials
from scaleset.client import Client
from scaleset.errors import ScaleSetError
from scaleset.testing.server import ServerThread
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from tests.conftest import details_of, zonal_spec

REGION = Region(zones=["1", "2", "3"])


@dataclass
class Pem:
    key: bytes
    cert: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def authority(name: str) -> tuple[Pem, Pem, Pem]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert(name, ca_key, None, ca=True)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    return (
        Pem(_pem_key(ca_key), pem(ca)),
        Pem(_pem_key(server_key), pem(_cert("server", server_key, (name, ca_key), server=True))),
        Pem(_pem_key(client_key), pem(_cert("client", client_key, (name, ca_key)))),
    )


def write(tmp: Path, server: Pem, ca: Pem | None = None) -> tuple[str, str, str | None]:
    (tmp / "server.key").write_bytes(server.key)
    (tmp / "server.crt").write_bytes(server.cert)
    if ca is not None:
        (tmp / "ca.crt").write_bytes(ca.cert)
    return str(tmp / "server.crt"), str(tmp / "server.key"), str(tmp / "ca.crt") if ca else None


def test_tls_serves_encrypted_and_refuses_plain_text(tmp_path: Path) -> None:
    ca, server, _ = authority("ca-one")
    cert, key, _ = write(tmp_path, server)
    with ServerThread(str(tmp_path / "state.db"), REGION, credentials=server_credentials(cert, key)) as s:
        with Client(s.target, root_certificates=ca.cert) as c:
            c.create_scale_set(zonal_spec(), 2)
            assert c.get_scale_set("web").capacity == 2
        with Client(s.target, retries=0, timeout=5) as plain, pytest.raises(ScaleSetError):
            plain.get_scale_set("web")
        # New certificates (another CA) are picked up without a restart.
        ca2, server2, _ = authority("ca-two")
        time.sleep(0.01)
        write(tmp_path, server2)
        os.utime(cert, (time.time() + 5, time.time() + 5))
        with Client(s.target, root_certificates=ca2.cert) as c:
            assert c.get_scale_set("web").capacity == 2


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    ca, server, client = authority("ca-m")
    cert, key, client_ca = write(tmp_path, server, ca)
    with ServerThread(
        str(tmp_path / "state.db"), REGION, credentials=server_credentials(cert, key, client_ca)
    ) as s:
        with Client(
            s.target, root_certificates=ca.cert, private_key=client.key, certificate_chain=client.cert
        ) as c:
            c.create_scale_set(zonal_spec(), 1)
        with Client(s.target, root_certificates=ca.cert, retries=0, timeout=5) as anonymous:
            with pytest.raises(ScaleSetError):
                anonymous.get_scale_set("web")


TOKENS = {"r-token": ("rita", "reader"), "o-token": ("omar", "operator"), "a-token": ("ada", "admin")}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "state.db"), REGION, authenticator=Authenticator(TOKENS)) as s:
        yield s


def test_roles_are_enforced_in_one_place(secured: ServerThread) -> None:
    with Client(secured.target, retries=0) as nobody, pytest.raises(ScaleSetError) as anonymous:
        nobody.list_scale_sets()
    assert anonymous.value.code == "Unauthenticated"
    with Client(secured.target, token="o-token") as operator:
        operator.create_scale_set(zonal_spec(), 2)
        with pytest.raises(ScaleSetError) as not_admin:
            operator.set_zone_available("2", False)
        assert not_admin.value.code == "PermissionDenied" and "admin" in str(not_admin.value)
    with Client(secured.target, token="r-token") as reader:
        assert reader.get_scale_set("web").capacity == 2
        with pytest.raises(ScaleSetError) as read_only:
            reader.set_capacity("web", 3)
        assert read_only.value.code == "PermissionDenied"
        assert next(iter(reader.watch("web"))).type == "ScaleSetCreated"  # streams are guarded too
    with Client(secured.target, token="a-token") as admin:
        admin.set_zone_available("2", False)
    with Client(secured.target, token="forged") as forged, pytest.raises(ScaleSetError):
        forged.list_scale_sets()
    # Probes need no token.
    with grpc.insecure_channel(secured.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_every_change_is_audited_with_who_and_request_id(secured: ServerThread) -> None:
    with Client(secured.target, token="o-token") as operator:
        operator.create_scale_set(zonal_spec(), 1, request_id="create-1")
        operator.set_capacity("web", 2, request_id="scale-1")
    audit = [
        (e.type, e.summary["actor"], e.summary.get("request_id"))
        for e in secured.control._store.iter_all_events()
    ]  # type: ignore[attr-defined]
    assert audit == [
        ("ScaleSetCreated", "omar (operator)", "create-1"),
        ("CapacitySet", "omar (operator)", "scale-1"),
    ]


def test_jwt_tokens_are_verified_with_their_claims() -> None:
    key = _key()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth = Authenticator(jwt_key=public, jwt_audience="scaleset", jwt_issuer="https://idp.test")
    claims = {
        "sub": "svc-deployer",
        "scaleset_role": "operator",
        "aud": "scaleset",
        "iss": "https://idp.test",
    }
    good = jwt.encode({**claims, "exp": time.time() + 60}, _pem_key(key), algorithm="ES256")
    who = auth.identify(good)
    assert who is not None and (who.name, who.role) == ("svc-deployer", "operator")
    expired = jwt.encode({**claims, "exp": time.time() - 60}, _pem_key(key), algorithm="ES256")
    other_audience = jwt.encode(
        {**claims, "aud": "else", "exp": time.time() + 60}, _pem_key(key), algorithm="ES256"
    )
    wrong_key = jwt.encode({**claims, "exp": time.time() + 60}, _pem_key(_key()), algorithm="ES256")
    no_role = jwt.encode(
        {**claims, "scaleset_role": "root", "exp": time.time() + 60}, _pem_key(key), algorithm="ES256"
    )
    assert [auth.identify(t) for t in (expired, other_audience, wrong_key, no_role)] == [None] * 4


def test_required_roles() -> None:
    assert required_role("/scaleset.v1.ScaleSets/GetScaleSet") == "reader"
    assert required_role("/scaleset.v1.ScaleSets/WatchEvents") == "reader"
    assert required_role("/scaleset.v1.Autoscale/EvaluateAutoscale") == "reader"
    assert required_role("/scaleset.v1.ScaleSets/SetCapacity") == "operator"
    assert required_role("/scaleset.v1.Autoscale/ReportMetrics") == "operator"
    assert required_role("/scaleset.v1.Regions/SetPoolCapacity") == "admin"
    assert required_role("/grpc.health.v1.Health/Check") is None


def test_no_plain_listening_beyond_localhost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scaleset.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "x.db"), "--metrics-port", "0"]) == 2
    assert "error [InsecureListenRefused]" in capsys.readouterr().err


def test_each_client_is_rate_limited(tmp_path: Path) -> None:
    from scaleset.service import RateLimiter

    now = [0.0]
    bucket = RateLimiter(2, burst=3, clock=lambda: now[0])
    assert [bucket.allow("a") for _ in range(4)] == [True, True, True, False]
    assert bucket.allow("b")  # another client has its own bucket
    now[0] += 0.5
    assert bucket.allow("a") and not bucket.allow("a")  # refilled at 2 a second
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, rate_limit=5) as s,
        Client(s.target, retries=0) as c,
    ):
        outcomes = []
        for _ in range(12):
            try:
                c.list_scale_sets()
                outcomes.append("ok")
            except ScaleSetError as e:
                outcomes.append(e.code)
        assert outcomes[:5] == ["ok"] * 5 and "RateLimited" in outcomes
        with grpc.insecure_channel(s.target) as channel:
            stub = pb_grpc.ScaleSetsStub(channel)
            code, (info, retry) = details_of(lambda: stub.ListScaleSets(pb.ListScaleSetsRequest()))
        # Told when to come back (google.rpc.RetryInfo), so clients back off instead of hammering.
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "RateLimited"  # type: ignore[attr-defined]
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0  # type: ignore[attr-defined]
