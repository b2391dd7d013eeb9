"""Bad requests get the right status and a message that names the problem, and the
server keeps serving afterwards. REST is driven with plain `requests` (to control the
exact bytes); gRPC with tritonclient, as a user would hit these errors.
"""

import json

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from numpy.testing import assert_allclose
from tritonclient.utils import InferenceServerException

import reference as ref


def _tensor(name, shape, datatype, data):
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": data}


def _magika_body(rows=1, name="bytes", datatype="INT32", shape=None, n=None):
    shape = shape or [rows, 2048]
    n = n if n is not None else int(np.prod(shape))
    data = [0.5] * n if datatype.startswith("FP") else [i % 256 for i in range(n)]
    return {"inputs": [_tensor(name, shape, datatype, data)]}


def _vad_tensors():
    return {
        "input": _tensor("input", [1, 576], "FP32", ref.vad_chunk().ravel().tolist()),
        "state": _tensor("state", [2, 1, 128], "FP32", [0.0] * 256),
        "sr": _tensor("sr", [], "INT64", [16000]),
    }


# (model, JSON body, HTTP status, fragments the error message must contain)
HTTP_CASES = {
    "unknown_model": ("no_such_model", _magika_body(), 404, ["no_such_model"]),
    "wrong_input_name": ("magika", _magika_body(name="byts"), 400, ["byts", "bytes"]),
    "wrong_datatype": ("magika", _magika_body(datatype="FP32"), 400, ["FP32", "INT32"]),
    "wrong_shape": ("magika", _magika_body(shape=[1, 1024]), 400, ["shape", "1024"]),
    "wrong_rank": ("magika", _magika_body(shape=[2048]), 400, ["shape"]),
    "wrong_element_count": ("magika", _magika_body(shape=[1, 2048], n=100), 400, ["100", "2048"]),
    "missing_input": (
        "silero_vad",
        {"inputs": [t for k, t in _vad_tensors().items() if k != "state"]},
        400,
        ["missing", "state"],
    ),
    "batch_too_large": ("magika", _magika_body(rows=33), 400, ["33", "32"]),
    "unknown_output": ("magika", {**_magika_body(), "outputs": [{"name": "nope"}]}, 400, ["nope"]),
    "priority_out_of_range": ("magika", {**_magika_body(), "parameters": {"priority": 9}}, 400, ["priority"]),
    "text_with_tokens": (
        "minilm",
        {"inputs": [_tensor("TEXT", [1, 1], "BYTES", ["hi"]), _tensor("input_ids", [1, 3], "INT64", [101, 7632, 102])]},
        400,
        ["TEXT"],
    ),
    "text_shape": ("minilm", {"inputs": [_tensor("TEXT", [1, 2], "BYTES", ["a", "b"])]}, 400, ["shape"]),
}


def _error_json(r):
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def _assert_good_request(base_url):
    x = ref.magika_random_batch(1, seed=31)
    body = {"inputs": [_tensor("bytes", x.shape, "INT32", x.ravel().tolist())]}
    r = requests.post(f"{base_url}/v2/models/magika/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "target_label" and out["shape"] == [1, 214]
    got = np.asarray(out["data"], dtype=np.float32).reshape(1, 214)
    assert_allclose(got, ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_http_infer_errors(base_url, case):
    model, body, status, fragments = HTTP_CASES[case]
    r = requests.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert r.status_code == status, r.text
    msg = _error_json(r)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    _assert_good_request(base_url)


def test_http_vad_good_json_request(base_url):
    # The missing-input case above is only meaningful if the full request is accepted.
    r = requests.post(
        f"{base_url}/v2/models/silero_vad/infer", json={"inputs": list(_vad_tensors().values())}, timeout=30
    )
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    exp_out, exp_state = ref.vad_ref(ref.vad_chunk(), np.zeros((2, 1, 128), np.float32))
    assert_allclose(np.reshape(outs["output"]["data"], outs["output"]["shape"]), exp_out, rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(
        np.reshape(outs["stateN"]["data"], outs["stateN"]["shape"]), exp_state, rtol=ref.RTOL, atol=ref.ATOL
    )


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [', b"not json at all", b'{"inputs": 3}', b"", b'{"inputs": [{"name": "bytes"}]}'],
    ids=["truncated", "not_json", "wrong_type", "empty", "tensor_without_shape"],
)
def test_http_malformed_json(base_url, body):
    r = requests.post(
        f"{base_url}/v2/models/magika/infer", data=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    _error_json(r)
    _assert_good_request(base_url)


def test_http_binary_size_mismatch(base_url):
    # Binary tensor extension: the payload holds 100 elements, the shape promises 2048.
    header = json.dumps(
        {"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "parameters": {"binary_data_size": 400}}]}
    ).encode()
    r = requests.post(
        f"{base_url}/v2/models/magika/infer",
        data=header + np.zeros(100, dtype=np.int32).tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    msg = _error_json(r)
    assert "8192" in msg and "400" in msg, msg
    _assert_good_request(base_url)


@pytest.mark.parametrize(
    "path", ["/v2/models/no_such_model", "/v2/models/no_such_model/config", "/v2/models/magika/versions/7"]
)
def test_http_unknown_model_metadata(base_url, path):
    r = requests.get(f"{base_url}{path}", timeout=30)
    assert r.status_code == 404, r.text
    _error_json(r)


# --- gRPC -------------------------------------------------------------------------

def _grpc_input(name, arr, datatype, wire_shape=None):
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    if wire_shape is not None:
        # tritonclient checks data against the shape; set the lie afterwards.
        inp.set_shape(list(wire_shape))
    return inp


def _vad_grpc_inputs(skip=()):
    arrays = {
        "input": (ref.vad_chunk(), "FP32"),
        "state": (np.zeros((2, 1, 128), np.float32), "FP32"),
        "sr": (np.array(16000, dtype=np.int64), "INT64"),
    }
    return [_grpc_input(k, a, dt) for k, (a, dt) in arrays.items() if k not in skip]


_ints = lambda *shape: np.zeros(shape, dtype=np.int32)  # noqa: E731

# (model, inputs factory, gRPC status, fragments the message must contain)
GRPC_CASES = {
    "unknown_model": ("no_such_model", lambda: [_grpc_input("bytes", _ints(1, 2048), "INT32")], "NOT_FOUND", ["no_such_model"]),
    "wrong_input_name": ("magika", lambda: [_grpc_input("byts", _ints(1, 2048), "INT32")], "INVALID_ARGUMENT", ["byts"]),
    "wrong_datatype": (
        "magika",
        lambda: [_grpc_input("bytes", np.zeros((1, 2048), np.float32), "FP32")],
        "INVALID_ARGUMENT",
        ["FP32", "INT32"],
    ),
    "wrong_shape": ("magika", lambda: [_grpc_input("bytes", _ints(1, 1024), "INT32")], "INVALID_ARGUMENT", ["shape"]),
    "wrong_element_count": (
        "magika",
        lambda: [_grpc_input("bytes", _ints(1, 100), "INT32", wire_shape=[1, 2048])],
        "INVALID_ARGUMENT",
        ["8192", "400"],
    ),
    "missing_input": ("silero_vad", lambda: _vad_grpc_inputs(skip=("state",)), "INVALID_ARGUMENT", ["state"]),
    "batch_too_large": ("magika", lambda: [_grpc_input("bytes", _ints(33, 2048), "INT32")], "INVALID_ARGUMENT", ["33", "32"]),
}


def _assert_good_grpc_request(client):
    x = ref.magika_random_batch(2, seed=32)
    res = client.infer("magika", [_grpc_input("bytes", x, "INT32")])
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_grpc_infer_errors(grpc_client, case):
    model, make_inputs, code, fragments = GRPC_CASES[case]
    with pytest.raises(InferenceServerException) as exc:
        grpc_client.infer(model, make_inputs())
    assert exc.value.status() == f"StatusCode.{code}", exc.value
    for f in fragments:
        assert f in exc.value.message(), f"{f!r} not in {exc.value.message()!r}"
    _assert_good_grpc_request(grpc_client)


def test_grpc_unknown_model_metadata(grpc_client):
    for call in (grpc_client.get_model_metadata, grpc_client.get_model_config):
        with pytest.raises(InferenceServerException) as exc:
            call("no_such_model")
        assert exc.value.status() == "StatusCode.NOT_FOUND"
        assert "no_such_model" in exc.value.message()


def test_grpc_deadline(grpc_client):
    # A 1 µs in-band timeout has always passed before the model can run.
    x = ref.magika_random_batch(1, seed=33)
    with pytest.raises(InferenceServerException) as exc:
        grpc_client.infer("magika", [_grpc_input("bytes", x, "INT32")], timeout=1)
    assert exc.value.status() == "StatusCode.DEADLINE_EXCEEDED", exc.value
    _assert_good_grpc_request(grpc_client)


def test_http_deadline(base_url):
    body = {**_magika_body(), "parameters": {"timeout": 1}}
    r = requests.post(f"{base_url}/v2/models/magika/infer", json=body, timeout=30)
    assert r.status_code == 504, r.text
    _error_json(r)
    _assert_good_request(base_url)
