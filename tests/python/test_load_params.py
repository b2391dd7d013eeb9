"""Load parameters through every stock client: a `config` override in Triton's JSON
field names is applied (and a later plain load goes back to the file), a malformed
one is 400 / INVALID_ARGUMENT and changes nothing, `file:` parameters are refused
cleanly, and loading a model that does not exist says it failed to load."""

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


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_file_parameters_and_unknown_models(addsub_server, mod):
    c = _client(mod, addsub_server)
    try:
        with pytest.raises(InferenceServerException) as exc:
            c.load_model("add_sub", config=json.dumps({"max_batch_size": 8}),
                         files={"file:1/model.onnx": built_models.add_sub_model()})
        assert exc.value.status() == _status(mod, "400")
        assert "not supported" in exc.value.message()
        with pytest.raises(InferenceServerException) as exc:
            c.load_model("no_such_model", config=json.dumps({"max_batch_size": 8}))
        assert exc.value.message().startswith("failed to load 'no_such_model'")
        assert c.is_model_ready("add_sub")
    finally:
        c.close()


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
