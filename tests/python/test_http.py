"""The server through tritonclient.http, exactly as a Triton user calls it."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from numpy.testing import assert_allclose
from tokenizers import Tokenizer

import reference as ref

MODELS = ("magika", "minilm", "silero_vad")
SIMILAR = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The stock market crashed after the announcement."


def test_health(http_client):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    for m in MODELS:
        assert http_client.is_model_ready(m), m
        assert http_client.is_model_ready(m, model_version="1"), m
    assert not http_client.is_model_ready("magika", model_version="2")
    assert not http_client.is_model_ready("no_such_model")


def test_server_metadata(http_client):
    md = http_client.get_server_metadata()
    assert md["name"] == "lattice"
    assert md["version"]
    assert "binary_tensor_data" in md["extensions"]
    assert "model_repository" in md["extensions"]


def test_model_metadata(http_client):
    md = http_client.get_model_metadata("magika")
    assert md["name"] == "magika"
    assert md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "bytes", "datatype": "INT32", "shape": [-1, 2048]}]
    assert md["outputs"] == [{"name": "target_label", "datatype": "FP32", "shape": [-1, 214]}]

    # Unbatched model: shapes are exactly the config dims, the scalar included.
    vad = http_client.get_model_metadata("silero_vad", model_version="1")
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in vad["inputs"] + vad["outputs"]}
    assert shapes == {
        "input": ("FP32", [1, 576]),
        "state": ("FP32", [2, 1, 128]),
        "sr": ("INT64", []),
        "output": ("FP32", [1, 1]),
        "stateN": ("FP32", [2, 1, 128]),
    }


def test_model_config(http_client):
    cfg = http_client.get_model_config("magika")
    assert cfg["name"] == "magika"
    assert cfg["max_batch_size"] == 32
    # Triton config convention: dims exclude the batch dimension.
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [("bytes", "TYPE_INT32", [2048])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("target_label", "TYPE_FP32", [214])]
    assert cfg["instance_group"][0]["count"] == 2

    minilm = http_client.get_model_config("minilm")
    assert {i["name"]: i["data_type"] for i in minilm["input"]} == {
        "TEXT": "TYPE_STRING",
        "input_ids": "TYPE_INT64",
        "attention_mask": "TYPE_INT64",
        "token_type_ids": "TYPE_INT64",
    }
    assert minilm["dynamic_batching"]["preferred_batch_size"] == [32]


def _magika_infer(client, x, binary):
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("target_label", binary_data=binary)
    return client.infer("magika", [inp], outputs=[out], request_id=f"magika-{binary}")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_magika_real_files(http_client, binary):
    paths, x = ref.magika_real_batch()
    res = _magika_infer(http_client, x, binary)
    got = res.as_numpy("target_label")
    assert got.dtype == np.float32 and got.shape == (len(paths), 214)
    assert_allclose(got, ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)
    labels = ref.magika_labels()
    assert [labels[i] for i in got.argmax(axis=1)] == [ref.MAGIKA_FILES[p] for p in paths]
    assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)  # probabilities
    resp = res.get_response()
    assert resp["model_name"] == "magika" and resp["model_version"] == "1"
    assert resp["id"] == f"magika-{binary}"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_magika_random_rows(http_client, binary):
    x = ref.magika_random_batch(3, seed=7)
    got = _magika_infer(http_client, x, binary).as_numpy("target_label")
    assert_allclose(got, ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


def test_magika_default_outputs_are_binary(http_client):
    # No outputs listed: tritonclient asks for all of them in binary.
    x = ref.magika_random_batch(2, seed=8)
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    res = http_client.infer("magika", [inp])
    assert res.get_output("target_label")["parameters"]["binary_data_size"] == 2 * 214 * 4
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


def _text_input(texts, shape, binary=True):
    inp = httpclient.InferInput("TEXT", list(shape), "BYTES")
    inp.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape), binary_data=binary)
    return inp


@pytest.mark.parametrize(
    "shape,binary", [((2, 1), True), ((2,), True), ((2, 1), False)], ids=["n1-binary", "n-binary", "n1-json"]
)
def test_minilm_text(http_client, shape, binary):
    texts = [SIMILAR[0], UNRELATED]
    res = http_client.infer(
        "minilm",
        [_text_input(texts, shape, binary)],
        outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)],
    )
    assert [o["name"] for o in res.get_response()["outputs"]] == ["embedding"]
    emb = res.as_numpy("embedding")
    assert emb.shape == (2, 384)
    assert_allclose(emb, ref.minilm_ref(texts), rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_minilm_similarity(http_client):
    texts = [*SIMILAR, UNRELATED]
    res = http_client.infer(
        "minilm",
        [_text_input(texts, (3, 1))],
        outputs=[httpclient.InferRequestedOutput("embedding")],
    )
    e = res.as_numpy("embedding")
    assert ref.cosine(e[0], e[1]) > 0.6
    assert ref.cosine(e[0], e[2]) < 0.3
    assert ref.cosine(e[1], e[2]) < 0.3


def test_minilm_tokens_match_text(http_client):
    texts = [SIMILAR[1], UNRELATED]
    by_text = http_client.infer(
        "minilm", [_text_input(texts, (2, 1))], outputs=[httpclient.InferRequestedOutput("embedding")]
    ).as_numpy("embedding")

    ids, mask = ref.minilm_tokens(texts)
    assert (mask == 0).any(), "the batch should need padding, or the mask is not exercised"
    inputs = []
    for name, arr in (("input_ids", ids), ("attention_mask", mask)):  # token_type_ids left out: zeros
        inp = httpclient.InferInput(name, list(arr.shape), "INT64")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    res = http_client.infer(
        "minilm",
        inputs,
        outputs=[httpclient.InferRequestedOutput("embedding"), httpclient.InferRequestedOutput("last_hidden_state")],
    )
    assert_allclose(res.as_numpy("embedding"), by_text, rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(res.as_numpy("embedding"), ref.minilm_ref(texts), rtol=ref.RTOL, atol=ref.ATOL)
    hidden = res.as_numpy("last_hidden_state")
    assert hidden.shape == (2, ids.shape[1], 384)
    expected_hidden = ref.session("minilm").run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    )[0]
    assert_allclose(hidden, expected_hidden, rtol=ref.RTOL, atol=ref.ATOL)


def _vad_inputs(chunk, state, sr):
    inputs = []
    for name, arr, dt in (("input", chunk, "FP32"), ("state", state, "FP32"), ("sr", sr, "INT64")):
        inp = httpclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def test_silero_vad(http_client):
    chunk = ref.vad_chunk(seed=1)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)  # 0-d: the model's `sr` is a scalar
    res = http_client.infer("silero_vad", _vad_inputs(chunk, state, sr))
    exp_out, exp_state = ref.vad_ref(chunk, state)
    out, state_n = res.as_numpy("output"), res.as_numpy("stateN")
    assert out.shape == (1, 1) and state_n.shape == (2, 1, 128)
    assert 0.0 <= out[0, 0] <= 1.0
    assert_allclose(out, exp_out, rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(state_n, exp_state, rtol=ref.RTOL, atol=ref.ATOL)
    assert np.abs(state_n).max() > 0, "the recurrent state should have moved"

    # Carry the state into the next chunk, as a streaming VAD client does.
    chunk2 = ref.vad_chunk(seed=2)
    res2 = http_client.infer("silero_vad", _vad_inputs(chunk2, state_n, sr))
    exp_out2, exp_state2 = ref.vad_ref(chunk2, exp_state)
    assert_allclose(res2.as_numpy("output"), exp_out2, rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(res2.as_numpy("stateN"), exp_state2, rtol=ref.RTOL, atol=ref.ATOL)


def test_priority_and_timeout_parameters(http_client):
    x = ref.magika_random_batch(1, seed=9)
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    # Realtime priority with a generous timeout (10 s, in microseconds) just works.
    res = http_client.infer("magika", [inp], priority=5, timeout=10_000_000)
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


def test_minilm_long_text_is_truncated_to_128_tokens(http_client):
    # 300+ tokens: the server truncates to the model's max_length (128) as
    # sentence-transformers does, instead of failing or running an oversized input.
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)
    assert len(ref.tokenizer().encode(text).ids) > 128
    emb = http_client.infer("minilm", [_text_input([text], (1, 1))]).as_numpy("embedding")
    tok = Tokenizer.from_file(str(ref.MODELS / "minilm" / "tokenizer.json"))
    tok.no_padding()  # keep the file's own truncation at 128
    enc = tok.encode(text)
    ids, mask = np.array([enc.ids]), np.array([enc.attention_mask])
    assert ids.shape == (1, 128)
    hidden = ref.session("minilm").run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    )[0]
    expected = hidden.mean(axis=1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert_allclose(emb, expected, rtol=ref.RTOL, atol=ref.ATOL)


def test_response_compression(http_client):
    x = ref.magika_random_batch(2, seed=10)
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    res = http_client.infer("magika", [inp], response_compression_algorithm="gzip")
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_compression(http_client, algorithm):
    x = ref.magika_random_batch(2, seed=10)
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    res = http_client.infer("magika", [inp], request_compression_algorithm=algorithm)
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)
