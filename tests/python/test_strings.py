"""BYTES tensors keep every byte: an Identity model on strings (built here with the
`onnx` package) answers exactly what it was sent, NUL bytes and non-UTF-8 included,
through every stock client; text elements agree with Python onnxruntime."""

import asyncio
import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio

import built_models

# Text (what Python onnxruntime can take) and raw bytes (what only a binary path can).
TEXT = [b"plain", b"a\x00b", "\u00e9\u4e2d\U0001f600".encode(), b"", b"\x00" * 3]
RAW = [b"\xff\xfe\x00", b"\x80" * 300, b"ok\xc3", bytes(range(256))]


@pytest.fixture(scope="module")
def strings_server(tmp_path_factory):
    repo = built_models.built_repository(tmp_path_factory.mktemp("string_repo"))
    log = tmp_path_factory.mktemp("string_server") / "lattice.log"
    with built_models.serving(repo, log) as addrs:
        yield addrs


def _array(items):
    return np.array([items], dtype=np.object_)


def _onnxruntime_identity(items):
    sess = ort.InferenceSession(built_models.identity_string_model())
    [out] = sess.run(None, {"INPUT0": np.array([[i.decode() for i in items]], dtype=object)})
    return [s.encode() for s in out[0]]


def _check(out, items):
    got = [bytes(x) for x in out.reshape(-1)]
    assert got == items


@pytest.mark.parametrize("binary", [True, False])
def test_http_round_trip(strings_server, binary):
    http, _ = strings_server
    c = httpclient.InferenceServerClient(http)
    items = TEXT + RAW if binary else TEXT
    x = httpclient.InferInput("INPUT0", [1, len(items)], "BYTES")
    x.set_data_from_numpy(_array(items), binary_data=binary)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    res = c.infer("identity_string", [x], outputs=[out])
    # The binary extension gives bytes; JSON gives text as str.
    got = [s.encode() if isinstance(s, str) else bytes(s) for s in res.as_numpy("OUTPUT0").reshape(-1)]
    assert got == items
    assert got[: len(TEXT)] == _onnxruntime_identity(TEXT)
    c.close()


def test_grpc_round_trip(strings_server):
    _, grpc_url = strings_server
    c = grpcclient.InferenceServerClient(grpc_url)
    items = TEXT + RAW
    x = grpcclient.InferInput("INPUT0", [1, len(items)], "BYTES")
    x.set_data_from_numpy(_array(items))
    _check(c.infer("identity_string", [x]).as_numpy("OUTPUT0"), items)
    c.close()


def test_aio_round_trip(strings_server):
    http, grpc_url = strings_server
    items = TEXT + RAW

    async def run():
        for mod, url in ((httpaio, http), (grpcaio, grpc_url)):
            c = mod.InferenceServerClient(url)
            try:
                x = mod.InferInput("INPUT0", [1, len(items)], "BYTES")
                x.set_data_from_numpy(_array(items))
                _check((await c.infer("identity_string", [x])).as_numpy("OUTPUT0"), items)
            finally:
                await c.close()

    asyncio.run(run())


def test_json_output_of_raw_bytes_is_written_as_triton_writes_it(strings_server):
    # Binary input, JSON output: the bytes go into the JSON string as they are, with
    # `"`, `\\` and control bytes escaped (rapidjson without validation, as Triton).
    http, _ = strings_server
    items = [b"\xff\x00\"", b"ok"]
    wire = b"".join(len(i).to_bytes(4, "little") + i for i in items)
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(wire)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    }).encode()
    r = requests.post(f"http://{http}/v2/models/identity_string/infer", data=header + wire,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200
    assert b'"data":["\xff\\u0000\\"","ok"]' in r.content


def test_batched_strings_from_concurrent_requests(strings_server):
    # Requests merged into one batch each get their own bytes back.
    _, grpc_url = strings_server
    c = grpcclient.InferenceServerClient(grpc_url)
    results = []
    def done(i):
        return lambda result, error: results.append((i, result, error))
    sent = {}
    for i in range(16):
        items = [bytes([i, 0, 255 - i]) * (i + 1), b"x" * i]
        sent[i] = items
        x = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
        x.set_data_from_numpy(_array(items))
        c.async_infer("identity_string", [x], done(i))
    deadline = time.monotonic() + 30
    while len(results) < 16:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i, result, error in results:
        assert error is None, error
        _check(result.as_numpy("OUTPUT0"), sent[i])
    c.close()


def test_a_model_that_cannot_take_the_bytes_says_400(server):
    # minilm tokenizes TEXT in the server, which needs UTF-8: the caller's value, 400.
    items = [b"\xff\xfe"]
    h = httpclient.InferenceServerClient(server.http_url)
    x = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    x.set_data_from_numpy(_array(items), binary_data=True)
    with pytest.raises(Exception) as exc:
        h.infer("minilm", [x])
    assert exc.value.status() == "400"
    h.close()
    g = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    x.set_data_from_numpy(_array(items))
    with pytest.raises(Exception) as exc:
        g.infer("minilm", [x])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    g.close()
