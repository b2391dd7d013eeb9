"""TLS on every port, mutual TLS on the gRPC port, certificates reloaded on change.

One `lattice serve` with --tls-cert/--tls-key on the REST, gRPC and metrics ports
and --tls-client-ca on the gRPC port, reached by stock clients (grpcio,
tritonclient over both protocols, requests) and by `lattice agent`. The
certificates are made here, per run, with the openssl command line: no key is
committed.
"""

import random
import socket
import ssl
import subprocess

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.testing import assert_allclose
from tritonclient.grpc import service_pb2, service_pb2_grpc

import reference as ref
from conftest import LATTICE_BIN, ROOT, STARTUP_TIMEOUT_S, _copy_repository, _log_tail, _read_listening_line
from hostile_support import assert_eventually


# --- certificates -----------------------------------------------------------------------------------

def _openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(d, name):
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return crt, key


def _leaf(d, name, ca, usage):
    """A certificate for 127.0.0.1 and localhost signed by `ca`, for
    serverAuth or clientAuth."""
    key, csr, crt, ext = (d / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-days", "2",
             "-set_serial", random.randrange(1, 2**62), "-extfile", ext, "-out", crt)
    return crt, key


class Pki:
    def __init__(self, d):
        self.dir = d
        self.ca = _ca(d, "server-ca")
        self.ca2 = _ca(d, "server-ca-2")
        self.client_ca = _ca(d, "client-ca")
        self.other_ca = _ca(d, "other-ca")
        self.server = _leaf(d, "server", self.ca, "serverAuth")
        self.server2 = _leaf(d, "server-2", self.ca2, "serverAuth")
        self.client = _leaf(d, "client", self.client_ca, "clientAuth")
        self.stranger = _leaf(d, "stranger", self.other_ca, "clientAuth")
        # The paths the server reads; rotation rewrites them.
        self.cert_path, self.key_path = d / "tls.crt", d / "tls.key"
        self.cert_path.write_bytes(self.server[0].read_bytes())
        self.key_path.write_bytes(self.server[1].read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# --- the server -------------------------------------------------------------------------------------

class TlsServer:
    def __init__(self, http, grpc_, metrics):
        self.http, self.grpc, self.metrics = http, grpc_, metrics


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tls_repository")
    _copy_repository(repo)
    log = tmp_path_factory.mktemp("tls_server") / "lattice.log"
    cmd = [
        LATTICE_BIN, "serve", "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--model-repository", str(repo),
        "--memory-store", str(tmp_path_factory.mktemp("tls_state") / "agents.redb"),
        "--auth", "off", "--rate-limits", "off", "--audit", "off",
        "--tls-cert", str(pki.cert_path), "--tls-key", str(pki.key_path),
        "--tls-client-ca", str(pki.client_ca[0]),
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f)
    try:
        line = _read_listening_line(proc, log)
        assert "tls=http,grpc,metrics mtls=grpc" in line, line
        addrs = dict(p.split("=", 1) for p in line.split()[2:])
        srv = TlsServer(addrs["http"], addrs["grpc"], addrs["metrics"])

        def ready():
            assert proc.poll() is None, f"server exited\n{_log_tail(log)}"
            r = requests.get(f"https://{srv.http}/v2/health/ready", verify=str(pki.ca[0]), timeout=2)
            assert r.status_code == 200, r.status_code

        assert_eventually(ready, timeout=STARTUP_TIMEOUT_S, step=0.1, what="TLS server ready")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    yield srv
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0, _log_tail(log)
    finally:
        proc.stdout.close()
    panics = [l for l in log.read_text(errors="replace").splitlines() if "panicked" in l]
    assert not panics, panics


def _grpc_channel(srv, pki, client=None, ca=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca)[0].read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.secure_channel(srv.grpc, creds)


def _vad_inputs(mod):
    chunk = ref.vad_chunk(seed=5)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    inputs = []
    for name, arr, dt in (("input", chunk, "FP32"), ("state", state, "FP32"), ("sr", sr, "INT64")):
        inp = mod.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return chunk, state, inputs


# --- tests ------------------------------------------------------------------------------------------

def test_grpcio_with_a_client_certificate(tls_server, pki):
    with _grpc_channel(tls_server, pki, client=pki.client) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
        meta = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="silero_vad"), timeout=10)
        assert meta.name == "silero_vad"


@pytest.mark.parametrize("who", ["no certificate", "a certificate from another CA"])
def test_grpc_port_refuses_clients_without_a_valid_certificate(tls_server, pki, who):
    client = None if who == "no certificate" else pki.stranger
    with _grpc_channel(tls_server, pki, client=client) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value


def test_tritonclient_grpc_ssl(tls_server, pki):
    c = grpcclient.InferenceServerClient(
        tls_server.grpc, ssl=True, root_certificates=str(pki.ca[0]),
        private_key=str(pki.client[1]), certificate_chain=str(pki.client[0]),
    )
    try:
        chunk, state, inputs = _vad_inputs(grpcclient)
        res = c.infer("silero_vad", inputs)
        exp_out, exp_state = ref.vad_ref(chunk, state)
        assert_allclose(res.as_numpy("output"), exp_out, rtol=ref.RTOL, atol=ref.ATOL)
        assert_allclose(res.as_numpy("stateN"), exp_state, rtol=ref.RTOL, atol=ref.ATOL)
    finally:
        c.close()


def test_tritonclient_http_ssl(tls_server, pki):
    c = httpclient.InferenceServerClient(tls_server.http, ssl=True, ssl_options={"ca_certs": str(pki.ca[0])})
    try:
        assert c.is_server_ready()
        chunk, state, inputs = _vad_inputs(httpclient)
        res = c.infer("silero_vad", inputs)
        exp_out, _ = ref.vad_ref(chunk, state)
        assert_allclose(res.as_numpy("output"), exp_out, rtol=ref.RTOL, atol=ref.ATOL)
    finally:
        c.close()


def test_rest_speaks_h2_and_http1_by_alpn(tls_server, pki):
    host, port = tls_server.http.rsplit(":", 1)
    for proto in ("h2", "http/1.1"):
        ctx = ssl.create_default_context(cafile=str(pki.ca[0]))
        ctx.set_alpn_protocols([proto])
        with socket.create_connection((host, int(port)), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname=host) as t:
                assert t.selected_alpn_protocol() == proto


def test_plain_text_is_refused_on_tls_ports(tls_server):
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{tls_server.http}/v2/health/live", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{tls_server.metrics}/metrics", timeout=10)


def test_metrics_over_tls(tls_server, pki):
    r = requests.get(f"https://{tls_server.metrics}/metrics", verify=str(pki.ca[0]), timeout=10)
    assert r.status_code == 200
    assert "lattice_" in r.text


def _agent(srv, pki, capability, log, client_cert=True):
    cmd = [LATTICE_BIN, "agent", "--orchestrator", f"https://{srv.grpc}", "--capability", capability,
           "--agent-id", f"tls-{capability}-{client_cert}", "--tls-ca", str(pki.ca[0]),
           "--log", "info,lattice_agent::client=debug"]
    if client_cert:
        cmd += ["--tls-client-cert", str(pki.client[0]), "--tls-client-key", str(pki.client[1])]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)


def _offer(srv, pki, capability, timeout_ms):
    return requests.post(
        f"https://{srv.http}/v1/agents/tasks",
        json={"capability": capability, "tool": "echo", "arguments": {"value": 7}, "timeout_ms": timeout_ms},
        headers={"x-tenant-id": "tls"}, verify=str(pki.ca[0]), timeout=30,
    )


def test_lattice_agent_needs_its_client_certificate(tls_server, pki, tmp_path):
    """`lattice agent` reaches the mutual-TLS gRPC port with --tls-ca and a client
    certificate, and a task offered over REST (TLS) is served by it; without the
    certificate the handshake fails and the same task is never served."""
    cap = "tools-mtls"
    without = _agent(tls_server, pki, cap, tmp_path / "without.log", client_cert=False)
    try:
        # It retries; the refused handshake shows in its log (and it stays up).
        assert_eventually(lambda: "agent link lost" in (tmp_path / "without.log").read_text(errors="replace").lower(),
                          timeout=30, step=0.2, what="agent without a certificate failing to connect")
        assert without.poll() is None
        r = _offer(tls_server, pki, cap, timeout_ms=1000)
        assert r.status_code != 200, r.text[:300]
        with_cert = _agent(tls_server, pki, cap, tmp_path / "with.log")
        try:
            def served():
                assert with_cert.poll() is None, _log_tail(tmp_path / "with.log")
                r = _offer(tls_server, pki, cap, timeout_ms=2000)
                assert r.status_code == 200, r.text[:300]
                return r.json()

            body = assert_eventually(served, timeout=30, step=0.2, what="agent serving over mTLS")
            assert "7" in str(body), body
        finally:
            with_cert.terminate()
            with_cert.wait(timeout=30)
    finally:
        without.terminate()
        without.wait(timeout=30)


def _served_ca(srv, pki):
    """Which CA's certificate a new connection to the REST port gets."""
    host, port = srv.http.rsplit(":", 1)
    for name, ca in (("ca", pki.ca), ("ca2", pki.ca2)):
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        try:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                with ctx.wrap_socket(s, server_hostname=host):
                    return name
        except ssl.SSLCertVerificationError:
            continue
    return None


def test_rotated_certificate_is_served_to_new_connections(tls_server, pki):
    """Last in the module: it leaves the second certificate in place."""
    assert _served_ca(tls_server, pki) == "ca"
    # An open gRPC channel made with the old certificate keeps working.
    ch = _grpc_channel(tls_server, pki, client=pki.client)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    # Key first, then certificate: in between the pair does not match and the old
    # one stays in force.
    pki.key_path.write_bytes(pki.server2[1].read_bytes())
    pki.cert_path.write_bytes(pki.server2[0].read_bytes())
    assert_eventually(lambda: _served_ca(tls_server, pki) == "ca2", timeout=20, step=0.2,
                      what="new connections get the rotated certificate")
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    ch.close()
    # Every port serves it: gRPC (with the client certificate) and metrics.
    with _grpc_channel(tls_server, pki, client=pki.client, ca=pki.ca2) as ch2:
        stub2 = service_pb2_grpc.GRPCInferenceServiceStub(ch2)
        assert stub2.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    r = requests.get(f"https://{tls_server.metrics}/metrics", verify=str(pki.ca2[0]), timeout=10)
    assert r.status_code == 200
