"""VLLMClient's error paths at the HTTP boundary: a closed port, and vLLM's side played by an
httpx.MockTransport that answers with the bodies vLLM 0.x sends (its ErrorResponse, its SSE stream,
its plain-text adapter replies). Our own code runs for real; only the network is replaced."""

import json
import threading

import httpx
import pytest
from helpers import build_lora, free_port

from data_store.models import Adapter
from serve import adapters
from serve.adapters import AdapterError
from serve.client import VLLMClient, VLLMError, VLLMUnavailable
from serve.services import build

URL = "http://vllm.test:8000"
CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}


def vllm_error(status: int, message: str, kind: str = "BadRequestError") -> httpx.Response:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return httpx.Response(status, json={"error": {"message": message, "type": kind, "param": None, "code": status}})


def answering(respond) -> VLLMClient:
    return VLLMClient(URL, transport=httpx.MockTransport(respond))


def sse(*events, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def chunk(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


# ---- nothing answers ----

def test_a_closed_port_is_unavailable_for_every_call():
    client = VLLMClient(f"http://127.0.0.1:{free_port()}")
    for call in (lambda: client.chat(CHAT), lambda: list(client.chat_stream(CHAT)), lambda: client.load_adapter("v1", "/x"),
                 lambda: client.unload_adapter("v1"), client.models):
        with pytest.raises(VLLMUnavailable, match="not reachable|stopped answering"):
            call()
    assert client.healthy() is False
    client.close()


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("disconnected")])
def test_transport_errors_are_unavailable_and_name_the_error(error):
    def fail(request):
        raise error

    client = answering(fail)
    with pytest.raises(VLLMUnavailable, match=type(error).__name__):
        client.chat(CHAT)
    with pytest.raises(VLLMUnavailable, match=type(error).__name__):
        list(client.chat_stream(CHAT))
    assert client.healthy() is False


# ---- vLLM answers with an error ----

@pytest.mark.parametrize("status,kind", [(400, "BadRequestError"), (404, "NotFoundError"), (500, "InternalServerError")])
def test_an_error_status_carries_vllms_message(status, kind):
    message = "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens."
    client = answering(lambda request: vllm_error(status, message, kind))
    with pytest.raises(VLLMError) as e:
        client.chat(CHAT)
    assert (e.value.status, e.value.message) == (status, message)
    assert str(e.value) == f"vLLM answered {status}: {message}"


def test_the_older_flat_error_body_and_a_proxys_plain_text_are_read_too():
    flat = {"object": "error", "message": "model 'v9' does not exist", "type": "NotFoundError", "param": None, "code": 404}
    with pytest.raises(VLLMError) as e:
        answering(lambda request: httpx.Response(404, json=flat)).chat(CHAT)
    assert (e.value.status, e.value.message) == (404, "model 'v9' does not exist")
    with pytest.raises(VLLMError) as e:
        answering(lambda request: httpx.Response(502, text="Bad Gateway" + "!" * 1000)).chat(CHAT)
    assert e.value.status == 502 and e.value.message == ("Bad Gateway" + "!" * 1000)[:500]


def test_a_streaming_request_refused_up_front_is_a_vllm_error():
    client = answering(lambda request: vllm_error(400, "temperature must be non-negative"))
    with pytest.raises(VLLMError) as e:
        list(client.chat_stream({**CHAT, "temperature": -1}))
    assert (e.value.status, e.value.message) == (400, "temperature must be non-negative")


# ---- streaming ----

def test_a_stream_yields_each_chunk_and_stops_at_done():
    sent = []

    def respond(request):
        sent.append(json.loads(request.content))
        body = b": keep-alive comment\n\n" + sse(chunk("Par"), chunk("is"), {"choices": [], "usage": {"completion_tokens": 2}})
        return httpx.Response(200, content=body + sse(chunk("after done")), headers={"content-type": "text/event-stream"})

    chunks = list(answering(respond).chat_stream(CHAT))
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:2]] == ["Par", "is"]
    assert chunks[2]["usage"] == {"completion_tokens": 2} and len(chunks) == 3  # nothing after [DONE]
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    assert sent[0]["messages"] == CHAT["messages"]


def test_an_error_event_mid_stream_reaches_the_caller_as_a_chunk():
    # vLLM reports a failure after the 200 as one more event, {"error": ...}, then [DONE].
    error = {"error": {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}}
    chunks = list(answering(lambda request: httpx.Response(200, content=sse(chunk("Pa"), error))).chat_stream(CHAT))
    assert chunks[1] == error


def test_a_connection_lost_mid_stream_is_unavailable_after_the_chunks_that_arrived():
    def body():
        yield sse(chunk("Pa"), done=False)
        raise httpx.ReadError("connection reset by peer")

    got = []
    with pytest.raises(VLLMUnavailable, match="stopped answering.*ReadError"):
        for c in answering(lambda request: httpx.Response(200, content=body())).chat_stream(CHAT):
            got.append(c)
    assert got == [chunk("Pa")]


# ---- adapters, health and the model list ----

def test_load_and_unload_send_vllms_fields_and_raise_its_refusals():
    sent = []

    def respond(request):
        sent.append((request.url.path, json.loads(request.content)))
        if request.url.path == "/v1/unload_lora_adapter":
            return vllm_error(404, "The lora adapter 'v2' cannot be found.", "NotFoundError")
        if len(sent) > 1:
            return vllm_error(400, "The lora adapter 'v1' has already been loaded. If you want to load the adapter in place, "
                                   "set 'load_inplace' to True.", "InvalidUserInput")
        return httpx.Response(200, text="Success: LoRA adapter 'v1' added successfully.")  # plain text, not JSON

    client = answering(respond)
    client.load_adapter("v1", "/data/adapters/v1")
    with pytest.raises(VLLMError, match="already been loaded") as e:
        client.load_adapter("v1", "/data/adapters/v1")
    assert e.value.status == 400
    with pytest.raises(VLLMError, match="cannot be found") as e:
        client.unload_adapter("v2")
    assert e.value.status == 404
    assert sent == [("/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": "/data/adapters/v1"})] * 2 + [
        ("/v1/unload_lora_adapter", {"lora_name": "v2"})]


def test_health_and_models():
    def respond(request):
        if request.url.path == "/health":
            return httpx.Response(503)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "base", "root": "/models/base"}]})

    client = answering(respond)
    assert client.healthy() is False
    assert client.models() == [{"id": "base", "root": "/models/base"}]
    assert answering(lambda request: httpx.Response(200)).healthy() is True


# ---- what serve/adapters.py does with those answers ----

class FakeVLLM:
    """vLLM's adapter endpoints as vLLM answers them, over a MockTransport; `probe_fails` makes chat refuse."""

    def __init__(self, loaded: dict[str, str] | None = None, probe_fails: bool = False):
        self.loaded = dict(loaded or {})
        self.probe_fails = probe_fails
        self.calls: list[tuple[str, str]] = []
        self.threads: list[str] = []  # which thread made each call
        self.client = answering(self.respond)

    def respond(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.url.path, body.get("lora_name") or body.get("model", "")))
        self.threads.append(threading.current_thread().name)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": n, "root": p} for n, p in self.loaded.items()]})
        if request.url.path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.loaded:
                return vllm_error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.", "InvalidUserInput")
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        if request.url.path == "/v1/unload_lora_adapter":
            if self.loaded.pop(body["lora_name"], None) is None:
                return vllm_error(404, f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError")
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")
        if self.probe_fails:
            return vllm_error(500, "CUDA error: an illegal memory access was encountered", "InternalServerError")
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "p"}}]})


def test_ensure_loaded_loads_once_and_refuses_another_stores_version_of_the_name():
    row = Adapter(name="v0001", path="/data/adapters/v0001", base_model="base", rank=4)
    vllm = FakeVLLM()
    adapters.ensure_loaded(vllm.client, row)
    adapters.ensure_loaded(vllm.client, row)  # already there from this path: not loaded twice
    assert [c for c in vllm.calls if c[0] == "/v1/load_lora_adapter"] == [("/v1/load_lora_adapter", "v0001")]
    other = FakeVLLM(loaded={"v0001": "/elsewhere/adapters/v0001"})
    with pytest.raises(AdapterError, match="two stores share this vLLM server"):
        adapters.ensure_loaded(other.client, row)
    assert other.loaded == {"v0001": "/elsewhere/adapters/v0001"}


def test_promotion_and_rollback_are_one_step_and_vllm_keeps_the_live_and_previous_versions(engine, settings, tiny_model, tmp_path):
    """Promoting a version vLLM already holds (a cycle's candidate, the previous one) sends the model no
    request; in the background the version that dropped out is unloaded and the new previous one loaded."""
    names = ("v-one", "v-two", "v-three", "v-four")
    for name in names:
        adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / name), name=name)
    vllm = FakeVLLM()
    svc = build(settings, engine, vllm.client, str(tiny_model))

    def calls(flip) -> tuple[list, list]:
        """Run a flip; once the background is done, the calls to the model (all but the models list) that
        the flip itself made, and those the background made."""
        vllm.calls.clear()
        vllm.threads.clear()
        me = threading.current_thread().name
        flip()
        svc.residency.wait(10)
        made = [(c, t == me) for c, t in zip(vllm.calls, vllm.threads, strict=True) if c[0] != "/v1/models"]
        return [c for c, mine in made if mine], [c for c, mine in made if not mine]

    # Not loaded yet: loaded and probed in the call.
    assert calls(lambda: svc.promote("v-one")) == ([("/v1/load_lora_adapter", "v-one"), ("/v1/chat/completions", "v-one")], [])
    for candidate, dropped in (("v-two", []), ("v-three", [("/v1/unload_lora_adapter", "v-one")])):
        adapters.ensure_loaded(vllm.client, adapters.get(engine, candidate))  # what the cycle's evaluation does
        # The call validates, flips and returns; what dropped out is unloaded in the background.
        assert calls(lambda c=candidate: svc.promote(c)) == ([], dropped) and adapters.active(engine) == candidate
    assert set(vllm.loaded) == {"v-two", "v-three"}

    back: list = []
    mine, background = calls(lambda: back.append(svc.rollback()))
    assert back == ["v-two"] and mine == []  # the previous version was held: instant too
    assert background == [("/v1/unload_lora_adapter", "v-three"), ("/v1/load_lora_adapter", "v-one"),
                          ("/v1/chat/completions", "v-one")]  # v-one is what the next rollback returns to
    assert set(vllm.loaded) == {"v-one", "v-two"}

    vllm.loaded.clear()  # vLLM restarted: it holds nothing
    svc.promote("v-three")
    svc.residency.wait(10)
    assert set(vllm.loaded) == {"v-two", "v-three"}  # unloading v-one answered 404, which is fine

    vllm.probe_fails = True
    with pytest.raises(VLLMError, match="illegal memory access"):
        svc.promote("v-four")
    svc.residency.wait(10)
    assert adapters.active(engine) == "v-three" and set(vllm.loaded) == {"v-two", "v-three"}  # v-four loaded, probed, unloaded
