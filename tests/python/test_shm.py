"""Triton's system shared memory extension with the stock clients and their
shared-memory utilities (`tritonclient.utils.shared_memory`), on both protocols:
the `onnx`-built Add/Sub model (Triton's `simple` contract), a string Identity, and
the bundled Magika. Hostile registrations and references each get their status and
code, and the server keeps serving."""

import asyncio
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import built_models

ROOT = Path(__file__).resolve().parents[2]
MAX_REGIONS = 6


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    repo = built_models.built_repository(tmp_path_factory.mktemp("shm_repo"))
    # The bundled Magika next to the built models (files, not links, as conftest copies).
    (repo / "magika" / "1").mkdir(parents=True)
    shutil.copy(ROOT / "models" / "magika" / "config.toml", repo / "magika" / "config.toml")
    shutil.copy(ROOT / "models" / "magika" / "1" / "model.onnx", repo / "magika" / "1" / "model.onnx")
    log = tmp_path_factory.mktemp("shm_server") / "lattice.log"
    with built_models.serving(repo, log, "--shm-max-regions", str(MAX_REGIONS)) as addrs:
        yield addrs


@pytest.fixture(autouse=True)
def clean_regions(shm_server):
    yield
    httpclient.InferenceServerClient(shm_server[0]).unregister_system_shared_memory()


class Regions:
    """Creates shm objects with unique keys and destroys them at the end."""

    def __init__(self):
        self.handles = []

    def create(self, name, size):
        key = f"/lattice_test_{uuid.uuid4().hex[:12]}_{name}"
        h = shm.create_shared_memory_region(name, key, size)
        self.handles.append(h)
        return h, key

    def close(self):
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()


def _inputs(mod, a, b):
    ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    return ins


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


def _triton_simple_flow(mod, client, regions):
    """The flow of Triton's simple_{http,grpc}_shm_client example."""
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    in_h, in_key = regions.create("input_data", 128)
    out_h, out_key = regions.create("output_data", 128)
    shm.set_shared_memory_region(in_h, [A, B])
    client.register_system_shared_memory("input_data", in_key, 128)
    client.register_system_shared_memory("output_data", out_key, 128)
    ins = _inputs(mod, A, B)
    ins[0].set_shared_memory("input_data", 64)
    ins[1].set_shared_memory("input_data", 64, offset=64)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    outs[0].set_shared_memory("output_data", 64)
    outs[1].set_shared_memory("output_data", 64, offset=64)
    result = client.infer("add_sub", ins, outputs=outs)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [1, 16]), A + B)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [1, 16], offset=64), A - B)
    return result, in_key, out_key


def test_http_simple_shm_flow(shm_server, regions):
    client = httpclient.InferenceServerClient(shm_server[0])
    result, in_key, out_key = _triton_simple_flow(httpclient, client, regions)
    out = result.get_output("OUTPUT1")
    # No data in the answer: the parameters say where it went.
    assert "data" not in out
    assert out["parameters"] == {
        "shared_memory_region": "output_data",
        "shared_memory_offset": 64,
        "shared_memory_byte_size": 64,
    }
    status = client.get_system_shared_memory_status()
    assert sorted(status, key=lambda s: s["name"]) == [
        {"name": "input_data", "key": in_key, "offset": 0, "byte_size": 128},
        {"name": "output_data", "key": out_key, "offset": 0, "byte_size": 128},
    ]
    assert client.get_system_shared_memory_status("input_data") == [
        {"name": "input_data", "key": in_key, "offset": 0, "byte_size": 128}
    ]
    client.unregister_system_shared_memory("input_data")
    assert [s["name"] for s in client.get_system_shared_memory_status()] == ["output_data"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


def test_grpc_simple_shm_flow(shm_server, regions):
    client = grpcclient.InferenceServerClient(shm_server[1])
    result, in_key, _ = _triton_simple_flow(grpcclient, client, regions)
    out = result.get_response().outputs[0]
    assert out.parameters["shared_memory_region"].string_param == "output_data"
    assert out.parameters["shared_memory_byte_size"].int64_param == 64
    # Raw contents stay aligned with outputs, empty for those in a region.
    assert list(result.get_response().raw_output_contents) == [b"", b""]
    status = client.get_system_shared_memory_status(as_json=True)
    assert status["regions"]["input_data"] == {"name": "input_data", "key": in_key, "byte_size": "128"}
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status(as_json=True) == {}


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_mixed_shm_and_socket_tensors(shm_server, regions, proto):
    """One input in a region, one sent through the socket; one output each way."""
    mod = httpclient if proto == "http" else grpcclient
    client = mod.InferenceServerClient(shm_server[0] if proto == "http" else shm_server[1])
    # The region is a window at a registration offset in a larger object.
    h, key = regions.create("big", 8192)
    shm.set_shared_memory_region(h, [B], offset=4096 + 64)
    client.register_system_shared_memory("win", key, 4096, offset=4096)
    ins = _inputs(mod, A, B)
    ins[0].set_data_from_numpy(A)
    ins[1].set_shared_memory("win", 64, offset=64)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    outs[1].set_shared_memory("win", 64, offset=1024)
    result = client.infer("add_sub", ins, outputs=outs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.int32, [1, 16], offset=4096 + 1024), A - B)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_strings_through_shm(shm_server, regions, proto):
    mod = httpclient if proto == "http" else grpcclient
    client = mod.InferenceServerClient(shm_server[0] if proto == "http" else shm_server[1])
    items = np.array([[b"a\x00b", "é".encode(), b"\xff\xfe", b""]], dtype=np.object_)
    wire = serialize_byte_tensor(items)
    size = len(wire.item())
    in_h, in_key = regions.create("s_in", size)
    out_h, out_key = regions.create("s_out", 256)
    shm.set_shared_memory_region(in_h, [wire])
    client.register_system_shared_memory("s_in", in_key, size)
    client.register_system_shared_memory("s_out", out_key, 256)
    inp = mod.InferInput("INPUT0", [1, 4], "BYTES")
    inp.set_shared_memory("s_in", size)
    out = mod.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("s_out", 256)
    client.infer("identity_string", [inp], outputs=[out])
    got = shm.get_contents_as_numpy(out_h, np.object_, [1, 4])
    assert got.tolist() == items.tolist()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_bundled_magika_through_shm(shm_server, regions, proto):
    mod = httpclient if proto == "http" else grpcclient
    client = mod.InferenceServerClient(shm_server[0] if proto == "http" else shm_server[1])
    rng = np.random.default_rng(7)
    x = rng.integers(0, 257, size=(1, 2048), dtype=np.int32)
    plain_in = mod.InferInput("bytes", [1, 2048], "INT32")
    plain_in.set_data_from_numpy(x)
    want = client.infer("magika", [plain_in]).as_numpy("target_label")
    in_h, in_key = regions.create("mg_in", x.nbytes)
    out_h, out_key = regions.create("mg_out", 214 * 4)
    shm.set_shared_memory_region(in_h, [x])
    client.register_system_shared_memory("mg_in", in_key, x.nbytes)
    client.register_system_shared_memory("mg_out", out_key, 214 * 4)
    inp = mod.InferInput("bytes", [1, 2048], "INT32")
    inp.set_shared_memory("mg_in", x.nbytes)
    out = mod.InferRequestedOutput("target_label")
    out.set_shared_memory("mg_out", 214 * 4)
    client.infer("magika", [inp], outputs=[out])
    got = shm.get_contents_as_numpy(out_h, np.float32, [1, 214])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert abs(float(got.sum()) - 1.0) < 1e-3


def test_aio_clients_register_status_unregister(shm_server, regions):
    h, key = regions.create("aio", 128)
    shm.set_shared_memory_region(h, [A, B])

    async def http_side():
        c = httpaio.InferenceServerClient(shm_server[0])
        try:
            await c.register_system_shared_memory("aio_h", key, 128)
            assert await c.get_system_shared_memory_status("aio_h") == [
                {"name": "aio_h", "key": key, "offset": 0, "byte_size": 128}
            ]
            ins = _inputs(httpaio, A, B)
            ins[0].set_shared_memory("aio_h", 64)
            ins[1].set_shared_memory("aio_h", 64, offset=64)
            r = await c.infer("add_sub", ins)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), A + B)
            await c.unregister_system_shared_memory("aio_h")
            assert await c.get_system_shared_memory_status() == []
            await c.unregister_cuda_shared_memory()
        finally:
            await c.close()

    async def grpc_side():
        c = grpcaio.InferenceServerClient(shm_server[1])
        try:
            await c.register_system_shared_memory("aio_g", key, 128)
            st = await c.get_system_shared_memory_status(as_json=True)
            assert st["regions"]["aio_g"]["key"] == key
            ins = _inputs(grpcaio, A, B)
            ins[0].set_shared_memory("aio_g", 64)
            ins[1].set_shared_memory("aio_g", 64, offset=64)
            r = await c.infer("add_sub", ins)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), A - B)
            await c.unregister_system_shared_memory()
            assert await c.get_system_shared_memory_status(as_json=True) == {}
            await c.unregister_cuda_shared_memory()
        finally:
            await c.close()

    asyncio.run(http_side())
    asyncio.run(grpc_side())


# --- hostile ---------------------------------------------------------------------------

HTTP_CODE = {"INVALID_ARGUMENT": "400", "NOT_FOUND": "404", "ALREADY_EXISTS": "400",
             "RESOURCE_EXHAUSTED": "429", "UNIMPLEMENTED": "501"}


def _both(shm_server):
    return [("http", httpclient.InferenceServerClient(shm_server[0])),
            ("grpc", grpcclient.InferenceServerClient(shm_server[1]))]


def _fails(proto, code, text, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as e:
        fn(*args, **kwargs)
    want = HTTP_CODE[code] if proto == "http" else f"StatusCode.{code}"
    assert e.value.status() == want, (proto, e.value.status(), e.value.message())
    assert text in e.value.message(), (proto, e.value.message())


def _names(proto, c):
    """The names of the registered regions, as either client reports them."""
    if proto == "http":
        return sorted(r["name"] for r in c.get_system_shared_memory_status())
    return sorted(c.get_system_shared_memory_status(as_json=True).get("regions", {}))


def _still_serving(shm_server):
    assert requests.get(f"http://{shm_server[0]}/v2/health/ready", timeout=10).status_code == 200
    for proto, c in _both(shm_server):
        mod = httpclient if proto == "http" else grpcclient
        ins = _inputs(mod, A, B)
        ins[0].set_data_from_numpy(A)
        ins[1].set_data_from_numpy(B)
        np.testing.assert_array_equal(c.infer("add_sub", ins).as_numpy("OUTPUT0"), A + B)


def test_hostile_keys_are_refused(shm_server, regions, tmp_path):
    _, real_key = regions.create("real", 64)
    # A link planted in /dev/shm pointing at a file elsewhere is not followed.
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 64)
    link = f"lattice_test_link_{uuid.uuid4().hex[:8]}"
    os.symlink(target, f"/dev/shm/{link}")
    try:
        cases = [
            ("/", "invalid shm key"),
            ("///", "invalid shm key"),
            ("../../etc/passwd", "invalid shm key"),
            ("/x/../../etc/passwd", "invalid shm key"),
            ("/..", "invalid shm key"),
            ("/" + "k" * 300, "invalid shm key"),
            ("/triton_python_backend_shm_region_1", "reserved prefix"),
            (f"/lattice_absent_{uuid.uuid4().hex}", "Unable to open shared memory region"),
            (f"/{link}", "Unable to open shared memory region"),
        ]
        for proto, c in _both(shm_server):
            for key, text in cases:
                _fails(proto, "INVALID_ARGUMENT", text, c.register_system_shared_memory, "r", key, 64)
            # Past the end of the object, and an offset + size that overflows.
            _fails(proto, "INVALID_ARGUMENT", "invalid args", c.register_system_shared_memory, "r", real_key, 65)
            _fails(proto, "INVALID_ARGUMENT", "invalid args",
                   c.register_system_shared_memory, "r", real_key, 8, offset=60)
            _fails(proto, "INVALID_ARGUMENT", "invalid args",
                   c.register_system_shared_memory, "r", real_key, 2**64 - 1, offset=2)
            assert _names(proto, c) == []
    finally:
        os.unlink(f"/dev/shm/{link}")
    assert target.read_bytes() == b"s" * 64
    # The REST register route needs a name in the path.
    r = requests.post(f"http://{shm_server[0]}/v2/systemsharedmemory/register",
                      json={"key": real_key, "byte_size": 64}, timeout=10)
    assert r.status_code == 400 and "'region name' is necessary" in r.json()["error"]
    for body, text in [({"byte_size": 64}, "no 'key' field"), ({"key": real_key}, "no 'byte_size' field"),
                       ({"key": real_key, "byte_size": -1}, "byte_size")]:
        r = requests.post(f"http://{shm_server[0]}/v2/systemsharedmemory/region/r/register", json=body, timeout=10)
        assert r.status_code == 400 and text in r.json()["error"], r.text
    _still_serving(shm_server)


def test_duplicate_name_and_too_many_regions(shm_server, regions):
    _, key = regions.create("dup", 64)
    for proto, c in _both(shm_server):
        c.register_system_shared_memory("dup", key, 64)
        _fails(proto, "ALREADY_EXISTS", "shared memory region 'dup' already in manager",
               c.register_system_shared_memory, "dup", key, 64)
        for i in range(1, MAX_REGIONS):
            c.register_system_shared_memory(f"r{i}", key, 64)
        _fails(proto, "RESOURCE_EXHAUSTED", "--shm-max-regions", c.register_system_shared_memory, "one_more", key, 64)
        # Unregistering an unknown name is not an error (Triton's rule); status of one is.
        c.unregister_system_shared_memory("ghost")
        _fails(proto, "NOT_FOUND", "Unable to find system shared memory region: 'ghost'",
               c.get_system_shared_memory_status, "ghost")
        c.unregister_system_shared_memory()
    _still_serving(shm_server)


def _shm_infer(mod, c, in_region, in_size, in_offset=0, out=None):
    ins = _inputs(mod, A, B)
    ins[0].set_shared_memory(in_region, in_size, offset=in_offset)
    ins[1].set_data_from_numpy(B)
    outs = None
    if out is not None:
        o = mod.InferRequestedOutput("OUTPUT0")
        o.set_shared_memory(*out)
        outs = [o]
    return c.infer("add_sub", ins, outputs=outs)


def test_hostile_references_at_infer(shm_server, regions):
    h, key = regions.create("ref", 256)
    shm.set_shared_memory_region(h, [A])
    for proto, c in _both(shm_server):
        mod = httpclient if proto == "http" else grpcclient
        c.register_system_shared_memory("ref", key, 128)
        _fails(proto, "NOT_FOUND", "Unable to find shared memory region: 'nope'", _shm_infer, mod, c, "nope", 64)
        _fails(proto, "INVALID_ARGUMENT", "input byte size mismatch for input 'INPUT0' for model 'add_sub'. "
               "Expected 64, got 60", _shm_infer, mod, c, "ref", 60)
        _fails(proto, "INVALID_ARGUMENT", "Invalid offset for shared memory region: 'ref'",
               _shm_infer, mod, c, "ref", 64, 128)
        _fails(proto, "INVALID_ARGUMENT", "Invalid offset + byte size for shared memory region: 'ref'",
               _shm_infer, mod, c, "ref", 64, 100)
        _fails(proto, "INVALID_ARGUMENT", "should be at least 64 bytes",
               _shm_infer, mod, c, "ref", 64, 0, ("ref", 32, 64))
        _fails(proto, "INVALID_ARGUMENT", "Invalid offset + byte size",
               _shm_infer, mod, c, "ref", 64, 0, ("ref", 64, 100))
        # A good request on the same region still works.
        np.testing.assert_array_equal(_shm_infer(mod, c, "ref", 64).as_numpy("OUTPUT0"), A + B)
        c.unregister_system_shared_memory()
    # A region and data for one input, and a region with binary data for an output.
    body = {"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": A.ravel().tolist(),
         "parameters": {"shared_memory_region": "ref", "shared_memory_byte_size": 64}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": B.ravel().tolist()}]}
    r = requests.post(f"http://{shm_server[0]}/v2/models/add_sub/infer", json=body, timeout=10)
    assert r.status_code == 400 and "But set 'data' 'shared_memory_region'" in r.json()["error"], r.text
    body["inputs"][0].pop("data")
    body["outputs"] = [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "ref",
                                                         "shared_memory_byte_size": 64, "binary_data": True}}]
    r = requests.post(f"http://{shm_server[0]}/v2/models/add_sub/infer", json=body, timeout=10)
    assert r.status_code == 400 and "can't set both 'shared_memory_region' and 'binary_data'" in r.json()["error"]
    _still_serving(shm_server)


def test_object_truncated_after_register_fails_the_request_not_the_server(shm_server, regions):
    h, key = regions.create("trunc", 128)
    shm.set_shared_memory_region(h, [A, B])
    for proto, c in _both(shm_server):
        mod = httpclient if proto == "http" else grpcclient
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 128)
        c.register_system_shared_memory("trunc", key, 128)
        # The client shrinks the object behind the server's back: a mapping would
        # SIGBUS; the server answers the request with an error instead.
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 80)
        _fails(proto, "INVALID_ARGUMENT", "truncated", _shm_infer, mod, c, "trunc", 64, 64)
        _fails(proto, "INVALID_ARGUMENT", "truncated", _shm_infer, mod, c, "trunc", 64, 0, ("trunc", 64, 64))
        # The write was refused, not made by growing the object back.
        assert os.stat(f"/dev/shm/{key.lstrip('/')}").st_size == 80
        c.unregister_system_shared_memory()
    _still_serving(shm_server)


def test_cuda_shared_memory_is_not_supported(shm_server):
    for proto, c in _both(shm_server):
        if proto == "http":
            _fails(proto, "UNIMPLEMENTED", "CUDA shared memory is not supported",
                   c.register_cuda_shared_memory, "gpu", b"\0" * 64, 0, 64)
            assert c.get_cuda_shared_memory_status() == []
        else:
            _fails(proto, "UNIMPLEMENTED", "CUDA shared memory is not supported",
                   c.register_cuda_shared_memory, "gpu", b"\0" * 64, 0, 64)
            assert c.get_cuda_shared_memory_status(as_json=True) == {}
        _fails(proto, "NOT_FOUND", "Unable to find cuda shared memory region: 'gpu'",
               c.get_cuda_shared_memory_status, "gpu")
        # Nothing to unregister: succeeds, as Triton's CPU build does.
        c.unregister_cuda_shared_memory()
        c.unregister_cuda_shared_memory("gpu")


def test_switched_off_registration_is_unimplemented(tmp_path, regions):
    repo = built_models.built_repository(tmp_path / "repo")
    _, key = regions.create("off", 64)
    with built_models.serving(repo, tmp_path / "off.log", "--system-shared-memory", "off", "--agents", "off") as (http, grpc_addr):
        for proto, c in [("http", httpclient.InferenceServerClient(http)),
                         ("grpc", grpcclient.InferenceServerClient(grpc_addr))]:
            _fails(proto, "UNIMPLEMENTED", "system shared memory is disabled",
                   c.register_system_shared_memory, "off", key, 64)
            assert _names(proto, c) == []
