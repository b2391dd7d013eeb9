"""Stock clients through the gateway: tritonclient (HTTP and gRPC) with headers and
grpcio with metadata, against a `lattice serve` with authentication on (API keys).

The server here is this module's own: the session server runs with `--auth off`.
"""

import hashlib
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest
import requests

from conftest import LATTICE_BIN, ROOT, _copy_repository, _log_tail, _read_listening_line

KEY = "lat_python_suite_key_0123456789"
OTHER_KEY = "lat_python_suite_metrics_only"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("auth_repository")
    _copy_repository(repo)
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(
        "".join(
            f'[[key]]\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n'
            f'tenant = "acme"\nuser = "{user}"\nscopes = {scopes}\n'
            for k, user, scopes in [(KEY, "ci", '["infer"]'), (OTHER_KEY, "ops", '["metrics"]')]
        )
    )
    log = tmp_path_factory.mktemp("auth_server") / "lattice.log"
    cmd = [
        LATTICE_BIN, "serve",
        "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--model-repository", str(repo),
        "--agents", "off",
        "--api-keys", str(keys),
        "--audit", str(tmp_path_factory.mktemp("auth_audit")),
    ]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
    try:
        line = _read_listening_line(proc, log)
        addrs = dict(part.split("=", 1) for part in line.split()[2:])
        assert line.endswith("auth=on limits=on audit=on"), line
        deadline = time.monotonic() + 30
        while requests.get(f"http://{addrs['http']}/v2/health/ready", timeout=2).status_code != 200:
            assert proc.poll() is None, _log_tail(log)
            assert time.monotonic() < deadline, _log_tail(log)
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    yield addrs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, _log_tail(log)
    proc.stdout.close()


def _magika_input(module):
    x = module.InferInput("bytes", [1, 2048], "INT32")
    x.set_data_from_numpy(np.zeros((1, 2048), dtype=np.int32))
    return x


# Passed as copies: the HTTP client adds its own header to the dict it is given.
GOOD = {"x-api-key": KEY, "x-tenant-id": "acme"}


def test_tritonclient_http_with_headers(auth_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    c = httpclient.InferenceServerClient(auth_server["http"])
    out = c.infer("magika", [_magika_input(httpclient)], headers=dict(GOOD)).as_numpy("target_label")
    assert out.shape[0] == 1
    # Health stays open.
    assert c.is_server_ready()
    for headers, status in [
        ({"x-tenant-id": "acme"}, "401"),
        ({"x-api-key": "wrong", "x-tenant-id": "acme"}, "401"),
        ({"x-api-key": KEY}, "403"),
        ({"x-api-key": KEY, "x-tenant-id": "globex"}, "403"),
        ({"x-api-key": OTHER_KEY, "x-tenant-id": "acme"}, "403"),
    ]:
        with pytest.raises(InferenceServerException) as e:
            c.infer("magika", [_magika_input(httpclient)], headers=dict(headers))
        assert e.value.status() == status, (headers, e.value)
    c.close()


def test_tritonclient_grpc_with_headers(auth_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(auth_server["grpc"])
    out = c.infer("magika", [_magika_input(grpcclient)], headers=dict(GOOD)).as_numpy("target_label")
    assert out.shape[0] == 1
    assert c.is_server_live()
    for headers, code in [
        ({"x-tenant-id": "acme"}, "StatusCode.UNAUTHENTICATED"),
        ({"x-api-key": KEY, "x-tenant-id": "globex"}, "StatusCode.PERMISSION_DENIED"),
    ]:
        with pytest.raises(InferenceServerException) as e:
            c.infer("magika", [_magika_input(grpcclient)], headers=dict(headers))
        assert e.value.status() == code, (headers, e.value)
    c.close()


def test_grpcio_with_metadata(auth_server):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(auth_server["grpc"]) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = service_pb2.ModelMetadataRequest(name="magika")
        meta = stub.ModelMetadata(req, metadata=[("x-api-key", KEY), ("x-tenant-id", "acme")])
        assert meta.name == "magika"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(req, metadata=[("x-tenant-id", "acme")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
