"""Load parameters through every stock client: a `config` override in Triton's JSON
field names is applied (and a later plain load goes back to the file), a malformed
one is 400 / INVALID_ARGUMENT and changes nothing, `file:<version>/model.onnx`
parameters load a model from the request's bytes (and bad ones are refused cleanly),
and loading a model that does not exist says it failed to load."""

import asyncio
import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

import built_models


@pytest.fixture(scope="module")
def addsub_server(tmp_path_factory):
    repo = built_models.built_repository(tmp_path_factory.mktemp("load_repo"))
    log = tmp_path_factory.mktemp("load_server") / "lattice.log"
    with built_models.serving(repo, log) as addrs:
        yield addrs


def _inputs(mod, rows):
    a = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16)
    b = np.ones((rows, 16), dtype=np.int32)
    xs = [mod.InferInput("INPUT0", [rows, 16], "INT32"), mod.InferInput("INPUT1", [rows, 16], "INT32")]
    xs[0].set_data_from_numpy(a)
    xs[1].set_data_from_numpy(b)
    return xs, a + b, a - b


def _max_batch(cfg):
    cfg = cfg if isinstance(cfg, dict) else json.loads(json.dumps(cfg))
    cfg = cfg.get("config", cfg)
    return int(cfg["max_batch_size"])


def _status(mod, code):
    return {"400": "StatusCode.INVALID_ARGUMENT"}[code] if mod in (grpcclient, grpcaio) else code


def _client(mod, addrs):
    return mod.InferenceServerClient(addrs[1] if mod in (grpcclient, grpcaio) else addrs[0])


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_config_override_sync(addsub_server, mod):
    c = _client(mod, addsub_server)
    cfg = lambda: _max_batch(c.get_model_config("add_sub", **({"as_json": True} if mod is grpcclient else {})))
    try:
        assert cfg() == 8
        xs, _, _ = _inputs(mod, 12)
        with pytest.raises(InferenceServerException):
            c.infer("add_sub", xs)
        # tritonclient's own example sends the number as a string.
        c.load_model("add_sub", config=json.dumps({"max_batch_size": "16"}))
        assert cfg() == 16
        xs, s, d = _inputs(mod, 12)
        r = c.infer("add_sub", xs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), s)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), d)
        # Malformed, unknown fields, wrong values: 400, and nothing changes.
        for bad in ["{", json.dumps({"inputs": []}), json.dumps({"max_batch_size": "many"}),
                    json.dumps({"input": [{"name": "INPUT0", "data_type": "TYPE_NOPE", "dims": [16]}]})]:
            with pytest.raises(InferenceServerException) as exc:
                c.load_model("add_sub", config=bad)
            assert exc.value.status() == _status(mod, "400"), bad
            assert "invalid config override" in exc.value.message(), exc.value.message()
            assert cfg() == 16
        # A plain load goes back to config.toml.
        c.load_model("add_sub")
        assert cfg() == 8
    finally:
        c.load_model("add_sub")
        c.close()


# The whole configuration of a model loaded from bytes, in Triton's field names.
ADD_SUB_JSON = json.dumps({
    "max_batch_size": 8,
    "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]},
              {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [16]},
               {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [16]}],
})


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_model_from_file_parameters(addsub_server, mod):
    c = _client(mod, addsub_server)
    name = f"from_bytes_{'grpc' if mod is grpcclient else 'http'}"
    try:
        # A name the repository does not have: the request's bytes are the model.
        c.load_model(name, config=ADD_SUB_JSON, files={"file:3/model.onnx": built_models.add_sub_model()})
        assert c.is_model_ready(name)
        assert c.is_model_ready(name, "3")
        assert not c.is_model_ready(name, "1")
        xs, s, d = _inputs(mod, 5)
        r = c.infer(name, xs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), s)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), d)
        index = c.get_model_repository_index(**({"as_json": True} if mod is grpcclient else {}))
        index = index if isinstance(index, list) else index.get("models", [])
        assert any(m["name"] == name and m.get("state") == "READY" for m in index), index
        # Bytes under a repository model's name replace its directory for this load.
        c.load_model("add_sub", config=ADD_SUB_JSON, files={"file:2/model.onnx": built_models.add_sub_model()})
        assert c.is_model_ready("add_sub", "2") and not c.is_model_ready("add_sub", "1")
        c.load_model("add_sub")
        assert c.is_model_ready("add_sub", "1")
    finally:
        c.load_model("add_sub")
        c.unload_model(name)
        c.close()


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_malformed_file_parameters(addsub_server, mod):
    c = _client(mod, addsub_server)
    good = built_models.add_sub_model()
    cases = [
        # Triton requires 'config' with files.
        (dict(files={"file:1/model.onnx": good}), "load parameter 'config' must be specified"),
        # Paths other than <positive int>/model.onnx, traversal included.
        (dict(config=ADD_SUB_JSON, files={"file:1/../../etc/model.onnx": good}), "only 'file:<version>/model.onnx'"),
        (dict(config=ADD_SUB_JSON, files={"file:0/model.onnx": good}), "only 'file:<version>/model.onnx'"),
        (dict(config=ADD_SUB_JSON, files={"file:1/config.pbtxt": good}), "only 'file:<version>/model.onnx'"),
        (dict(config=ADD_SUB_JSON, files={f"file:{v}/model.onnx": good for v in range(1, 6)}), "at most 4"),
        # Bytes that are no ONNX model, and a model its config does not describe.
        (dict(config=ADD_SUB_JSON, files={"file:1/model.onnx": b"not an onnx model"}),
         "load failed for model 'broken': version 1 is at UNAVAILABLE state:"),
        (dict(config=json.dumps({"max_batch_size": 8,
                                 "input": [{"name": "X", "data_type": "TYPE_INT32", "dims": [16]}],
                                 "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [16]}]}),
              files={"file:1/model.onnx": good}), "is not an input of the model"),
        (dict(config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": good}),
         "needs 'input' and 'output'"),
        (dict(config="{", files={"file:1/model.onnx": good}), "invalid config override"),
    ]
    try:
        for kw, text in cases:
            with pytest.raises(InferenceServerException) as exc:
                c.load_model("broken", **kw)
            assert exc.value.status() == _status(mod, "400"), (kw.get("files", {}).keys(), exc.value)
            assert text in exc.value.message(), exc.value.message()
            assert not c.is_model_ready("broken")
        # The same kind of bad load under a served name changes nothing.
        with pytest.raises(InferenceServerException):
            c.load_model("add_sub", config=ADD_SUB_JSON, files={"file:1/model.onnx": b"\x00" * 64})
        assert c.is_model_ready("add_sub")
        xs, s, _ = _inputs(mod, 2)
        np.testing.assert_array_equal(c.infer("add_sub", xs).as_numpy("OUTPUT0"), s)
        with pytest.raises(InferenceServerException) as exc:
            c.load_model("no_such_model", config=json.dumps({"max_batch_size": 8}))
        assert exc.value.message().startswith("failed to load 'no_such_model'")
    finally:
        c.close()


def test_file_parameters_are_bounded_by_the_body_limit(tmp_path):
    """Model bytes above --max-body-bytes are refused on both protocols (413 on REST,
    OUT_OF_RANGE on gRPC, where the message itself is over the limit)."""
    repo = built_models.built_repository(tmp_path / "repo")
    model = built_models.add_sub_model()
    with built_models.serving(repo, tmp_path / "log", "--max-body-bytes", str(len(model) + len(ADD_SUB_JSON) + 100),
                              "--memory-store", str(tmp_path / "agents.redb")) as addrs:
        # Base64 grows the REST body past the limit; the raw gRPC bytes fit.
        grpc = grpcclient.InferenceServerClient(addrs[1])
        grpc.load_model("small", config=ADD_SUB_JSON, files={"file:1/model.onnx": model})
        assert grpc.is_model_ready("small")
        with pytest.raises(InferenceServerException) as exc:
            grpc.load_model("big", config=ADD_SUB_JSON, files={"file:1/model.onnx": model + b"\x00" * 512})
        assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED" or exc.value.status() == "StatusCode.OUT_OF_RANGE"
        http = httpclient.InferenceServerClient(addrs[0])
        with pytest.raises(InferenceServerException) as exc:
            http.load_model("big", config=ADD_SUB_JSON, files={"file:1/model.onnx": model})
        assert exc.value.status() == "413"
        assert not http.is_model_ready("big")
        grpc.close()
        http.close()


@pytest.mark.parametrize("mod", [httpaio, grpcaio], ids=["http.aio", "grpc.aio"])
def test_config_override_aio(addsub_server, mod):
    async def run():
        c = _client(mod, addsub_server)
        kw = {"as_json": True} if mod is grpcaio else {}
        try:
            await c.load_model("add_sub", config=json.dumps({"max_batch_size": 12}))
            assert _max_batch(await c.get_model_config("add_sub", **kw)) == 12
            with pytest.raises(InferenceServerException) as exc:
                await c.load_model("add_sub", config="{")
            assert exc.value.status() == _status(mod, "400")
            await c.load_model("add_sub")
            assert _max_batch(await c.get_model_config("add_sub", **kw)) == 8
        finally:
            await c.close()

    asyncio.run(run())
