"""Stateful sequences on Silero VAD (implicit state, Triton's sequence parameters):
a stream of real speech chunks, sent with only `input` and `sr`, gives the same
probabilities as Python onnxruntime carrying the state by hand; interleaved sequences
do not mix; idle sequences are forgotten and free their place; past
max_candidate_sequences a new sequence is refused; errors use Triton's texts."""

import shutil
import subprocess
import time
import wave

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import built_models
import reference
from conftest import MODELS

CHUNK = 512
CONTEXT = 64


def speech(text, tmp_path):
    """`text` spoken by espeak-ng, resampled to 16 kHz float32 in [-1, 1]."""
    wav = tmp_path / f"speech_{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(wav)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    t_out = np.arange(int(len(pcm) * 16000 / rate)) / 16000.0
    return np.interp(t_out, np.arange(len(pcm)) / rate, pcm).astype(np.float32)


def chunks(audio):
    """Silero's streaming input: 64 samples of context, then 512 new ones."""
    out, context = [], np.zeros(CONTEXT, dtype=np.float32)
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        new = audio[i:i + CHUNK]
        out.append(np.concatenate([context, new]).reshape(1, CONTEXT + CHUNK))
        context = new[-CONTEXT:]
    return out


def by_hand(chunk_list):
    state = np.zeros((2, 1, 128), dtype=np.float32)
    probs = []
    for c in chunk_list:
        out, state = reference.vad_ref(c, state)
        probs.append(float(out.reshape(-1)[0]))
    return np.array(probs, dtype=np.float32)


def _inputs(mod, chunk):
    x = mod.InferInput("input", [1, CONTEXT + CHUNK], "FP32")
    x.set_data_from_numpy(chunk)
    sr = mod.InferInput("sr", [], "INT64")
    sr.set_data_from_numpy(np.array(16000, dtype=np.int64))
    return [x, sr]


def _step(c, mod, seq_id, chunk, start=False, end=False, outputs=None):
    r = c.infer("silero_vad", _inputs(mod, chunk), sequence_id=seq_id, sequence_start=start, sequence_end=end,
                outputs=[mod.InferRequestedOutput(o) for o in outputs] if outputs else None)
    return float(r.as_numpy("output").reshape(-1)[0]), r


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    a = chunks(speech("Streaming voice activity detection keeps its state on the server.", tmp))
    b = chunks(speech("Two sequences at once must never share their state.", tmp))
    assert len(a) > 20 and len(b) > 20
    return a, b


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_stream_matches_state_carried_by_hand(server, utterances, mod):
    a, _ = utterances
    want = by_hand(a)
    # Real speech: the model hears it.
    assert want.max() > 0.5, want
    c = mod.InferenceServerClient(server.grpc_url if mod is grpcclient else server.http_url)
    got = []
    for i, ch in enumerate(a):
        # Only the probability asked for: the server still carries stateN.
        p, r = _step(c, mod, 9001, ch, start=i == 0, end=i == len(a) - 1, outputs=["output"])
        assert r.as_numpy("stateN") is None
        got.append(p)
    np.testing.assert_allclose(np.array(got, dtype=np.float32), want, rtol=1e-4, atol=1e-5)
    # Ended: the next request without START is refused in Triton's words.
    with pytest.raises(InferenceServerException) as exc:
        _step(c, mod, 9001, a[0])
    assert exc.value.message().startswith(
        "inference request for sequence 9001 to model 'silero_vad' must specify the START flag"), exc.value.message()
    c.close()


@pytest.mark.parametrize("mod", [httpclient, grpcclient], ids=["http", "grpc"])
def test_interleaved_sequences_do_not_mix(server, utterances, mod):
    a, b = utterances
    n = min(len(a), len(b))
    want_a, want_b = by_hand(a[:n]), by_hand(b[:n])
    c = mod.InferenceServerClient(server.grpc_url if mod is grpcclient else server.http_url)
    got_a, got_b = [], []
    for i in range(n):
        got_a.append(_step(c, mod, 77, a[i], start=i == 0, end=i == n - 1)[0])
        # A string correlation ID beside an integer one.
        got_b.append(_step(c, mod, "speaker-b", b[i], start=i == 0, end=i == n - 1)[0])
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(want_a, want_b)
    # Without a sequence_id the client carries the state itself, as before.
    x = _inputs(mod, a[0])
    st = mod.InferInput("state", [2, 1, 128], "FP32")
    st.set_data_from_numpy(np.zeros((2, 1, 128), dtype=np.float32))
    r = c.infer("silero_vad", x + [st])
    np.testing.assert_allclose(r.as_numpy("output").reshape(-1)[0], want_a[0], rtol=1e-4, atol=1e-5)
    c.close()


def test_errors_in_tritons_words(base_url, utterances):
    a, _ = utterances
    body = lambda params, state=False: {
        "inputs": [{"name": "input", "shape": [1, 576], "datatype": "FP32", "data": a[0].reshape(-1).tolist()},
                   {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}]
        + ([{"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256}] if state else []),
        "parameters": params}
    url = f"{base_url}/v2/models/silero_vad/infer"
    for params, text in [
        ({"sequence_id": 0, "sequence_start": True},
         "inference request to model 'silero_vad' must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": "", "sequence_start": True}, "must specify a non-zero or non-empty correlation ID"),
        ({"sequence_id": 424242}, "inference request for sequence 424242 to model 'silero_vad' must specify the START flag"),
        ({"sequence_id": "nobody"}, "inference request for sequence nobody to model 'silero_vad' must specify the START"),
        ({"sequence_id": 5, "sequence_start": "yes"},
         "Unable to parse 'sequence_start': attempt to access JSON non-boolean as boolean"),
        ({"sequence_id": -5, "sequence_start": True}, "Unable to parse 'sequence_id'"),
    ]:
        r = requests.post(url, json=body(params), timeout=30)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"].startswith(text) or text in r.json()["error"], (params, r.text)
    # The state is the server's inside a sequence.
    r = requests.post(url, json=body({"sequence_id": 6, "sequence_start": True}, state=True), timeout=30)
    assert r.status_code == 400 and "'state'" in r.json()["error"]


def test_grpc_parameter_types(server, utterances):
    a, _ = utterances
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    req = service_pb2.ModelInferRequest(model_name="silero_vad")
    x = req.inputs.add(name="input", datatype="FP32", shape=[1, 576])
    x.contents.fp32_contents.extend(a[0].reshape(-1).tolist())
    sr = req.inputs.add(name="sr", datatype="INT64", shape=[])
    sr.contents.int64_contents.append(16000)
    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for key, set_param, text in [
            ("sequence_id", lambda p: setattr(p, "uint64_param", 5),
             "invalid value type for 'sequence_id' parameter, expected int64_param or string_param."),
            ("sequence_start", lambda p: setattr(p, "int64_param", 1),
             "invalid value type for 'sequence_start' parameter, expected bool_param."),
        ]:
            r = service_pb2.ModelInferRequest()
            r.CopyFrom(req)
            r.parameters["sequence_id"].int64_param = 5
            set_param(r.parameters[key])
            with pytest.raises(grpc.RpcError) as exc:
                stub.ModelInfer(r)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.value.details() == text


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """Silero with room for 2 live sequences, each forgotten after 2 s idle."""
    repo = tmp_path_factory.mktemp("seq_repo")
    d = repo / "silero_vad"
    (d / "1").mkdir(parents=True)
    shutil.copy2(MODELS / "silero_vad" / "1" / "model.onnx", d / "1" / "model.onnx")
    cfg = (MODELS / "silero_vad" / "config.toml").read_text()
    cfg = cfg.replace("max_sequence_idle_microseconds = 30000000", "max_sequence_idle_microseconds = 2000000")
    cfg = cfg.replace("max_candidate_sequences = 1024", "max_candidate_sequences = 2")
    assert "max_candidate_sequences = 2" in cfg and "= 2000000" in cfg
    (d / "config.toml").write_text(cfg)
    tmp = tmp_path_factory.mktemp("seq_server")
    with built_models.serving(repo, tmp / "log", "--memory-store", str(tmp / "agents.redb")) as addrs:
        yield addrs


def test_bound_and_idle_expiry(small_server, utterances):
    a, _ = utterances
    http = httpclient.InferenceServerClient(small_server[0])
    grpc_c = grpcclient.InferenceServerClient(small_server[1])
    _step(http, httpclient, 1, a[0], start=True)
    _step(grpc_c, grpcclient, 2, a[0], start=True)
    # A third live sequence is over the bound: 429 / RESOURCE_EXHAUSTED.
    with pytest.raises(InferenceServerException) as exc:
        _step(http, httpclient, 3, a[0], start=True)
    assert exc.value.status() == "429", exc.value
    assert "max_candidate_sequences" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        _step(grpc_c, grpcclient, 3, a[0], start=True)
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # Once the two are idle past the limit they are forgotten and the new one fits.
    deadline = time.monotonic() + 60
    while True:
        try:
            _step(http, httpclient, 3, a[0], start=True)
            break
        except InferenceServerException as e:
            assert e.status() == "429"
            assert time.monotonic() < deadline, "idle sequences never freed their place"
            time.sleep(0.2)
    with pytest.raises(InferenceServerException) as exc:
        _step(http, httpclient, 1, a[1])
    assert "must specify the START flag" in exc.value.message()
    # Ending a sequence frees its place at once.
    _step(http, httpclient, 4, a[0], start=True)
    _step(http, httpclient, 4, a[1], end=True)
    _step(grpc_c, grpcclient, "five", a[0], start=True)
    http.close()
    grpc_c.close()
