"""The OpenAI inference routes (/v1/chat/completions, /v1/completions), /v1/models, the files
object, and the TGI routes through the real clients' own response types: the `openai` package,
`text_generation` (TGI's), `lorax` (LoRAX's) and `huggingface_hub`'s InferenceClient, each
against the app served by uvicorn in a thread, on the tiny model with adapters made as a finished
job leaves them (see test_service_generate)."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest_service import dataset, served_in_thread
from fastapi.testclient import TestClient
from transformers import AutoTokenizer
from test_service_generate import PROMPT, make_adapter, new_tenant, settings  # noqa: F401 - the module's settings fixture

from service.api.app import create_app
from service.api.chat_template import render_chat

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MESSAGES = [{"role": "system", "content": "You add."}, {"role": "user", "content": "3+4="}]


@pytest.fixture(scope="module")
def served(settings, tiny_model_path):  # noqa: F811
    """(base URL, app, tenant headers, tenant id, adapter id)."""
    app = create_app(settings)
    with served_in_thread(app) as url:
        tenant_id, headers = new_tenant(app, "openai")
        yield url, app, headers, tenant_id, make_adapter(app, tiny_model_path, tenant_id)


@pytest.fixture(scope="module")
def http(served):
    url, _, headers, _, _ = served
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(served):
    url, _, headers, _, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0)


def greedy_generate(http, prompt: str, adapter_id: str | None, max_new_tokens: int) -> dict:
    """What /generate answers, greedily, for the same prompt (the reference)."""
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter_id, "max_new_tokens": max_new_tokens, "details": True}}
    response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- chat completions --------------------------------------------------------------------------


def test_chat_greedy_is_the_chat_template_through_the_same_engine(served, http, client, tiny_model_path):
    _, app, _, _, adapter_id = served
    reply = client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=12)
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.object == "chat.completion" and reply.model == adapter_id and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
    prompt = render_chat(app.state.settings, "tiny", MESSAGES)
    template = AutoTokenizer.from_pretrained(tiny_model_path).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == template == "<|system|>You add.<|eos|><|user|>3+4=<|eos|><|assistant|>"  # as training renders chat records
    reference = greedy_generate(http, prompt, adapter_id, 12)
    assert choice.message.content == reference["generated_text"]
    details = reference["details"]
    assert choice.finish_reason == ("length" if details["finish_reason"] == "length" else "stop")
    assert reply.usage.prompt_tokens == details["prompt_tokens"]
    assert reply.usage.completion_tokens == details["generated_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    assert base.choices[0].message.content == greedy_generate(http, prompt, None, 12)["generated_text"]


def test_chat_max_completion_tokens_wins_and_logprobs(served, client):
    _, _, _, _, adapter_id = served
    reply = client.chat.completions.create(
        model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=30, max_completion_tokens=5, logprobs=True, top_logprobs=0,
    )
    assert reply.usage.completion_tokens <= 5
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) and t.top_logprobs == [] for t in content)


def test_sampling_follows_openai_and_the_seed_repeats_it(served, client):
    _, _, _, _, adapter_id = served

    def sample(**kwargs):
        return client.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=16, **kwargs).choices[0].message.content

    greedy = sample(temperature=0)
    # No temperature: OpenAI's default, 1, samples (TGI's default would be greedy).
    drawn = {sample(seed=seed) for seed in range(4)}
    assert len(drawn) > 1 and sample(seed=3) == sample(seed=3)
    assert sample(seed=3, temperature=1.5, top_p=0.9) == sample(seed=3, temperature=1.5, top_p=0.9)
    assert greedy == sample(temperature=0, seed=5)


def test_a_stop_sequence_ends_the_text_and_is_left_out(served, http, client):
    _, app, _, _, adapter_id = served
    full = client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=24).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[2:4]
    expected = full[: full.find(stop)]
    reply = client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=24, stop=stop)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    # Streamed, the text that could begin the stop sequence is held back, never sent.
    stream = client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=24, stop=[stop], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    completion = client.completions.create(model=adapter_id, prompt=render_chat(app.state.settings, "tiny", MESSAGES), temperature=0, max_tokens=24, stop=[stop])
    assert completion.choices[0].text == expected


def test_chat_stream_chunks_add_up_and_the_last_carries_the_usage(served, client):
    _, _, _, _, adapter_id = served
    reply = client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(
        model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True},
        logprobs=True,
    ))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    *choices, usage = chunks
    assert usage.choices == [] and usage.usage == reply.usage
    assert all(c.usage is None for c in choices)
    assert "".join(c.choices[0].delta.content or "" for c in choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in choices][-1] == reply.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in choices[:-1])
    tokens = [t.token for c in choices for t in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert "".join(tokens) == reply.choices[0].message.content
    plain = list(client.chat.completions.create(model=adapter_id, messages=MESSAGES, temperature=0, max_tokens=10, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_text_completions_plain_echo_token_ids_and_stream(served, http, client):
    _, _, _, _, adapter_id = served
    reference = greedy_generate(http, PROMPT, adapter_id, 8)
    completion = client.completions.create(model=adapter_id, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=0)
    assert isinstance(completion, openai.types.Completion) and completion.object == "text_completion"
    choice = completion.choices[0]
    assert choice.text == reference["generated_text"] and completion.usage.completion_tokens == reference["details"]["generated_tokens"]
    assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.text_offset[0] == 0
    assert choice.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in reference["details"]["tokens"] if not t["special"]][: len(choice.logprobs.tokens)], abs=1e-4)
    echoed = client.completions.create(model=adapter_id, prompt=[PROMPT], temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text
    ids = [256, *PROMPT.encode()]  # the tiny model's bos, then its tokens: the bytes (the ids are the prompt as given)
    by_ids = client.completions.create(model=adapter_id, prompt=ids, temperature=0, max_tokens=8)
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.choices[0].text == choice.text
    default = client.completions.create(model=adapter_id, prompt=PROMPT, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens of a completion
    streamed = list(client.completions.create(model=adapter_id, prompt=PROMPT, temperature=0, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].usage == completion.usage


# --- errors ------------------------------------------------------------------------------------


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_another_tenants_adapter_is_a_404_in_openais_shape(served, client):
    url, app, _, _, adapter_id = served
    _, other_headers = new_tenant(app, "other")
    other = openai.OpenAI(base_url=f"{url}/v1", api_key=other_headers["Authorization"].split()[1], max_retries=0)
    for model in (adapter_id, "ad-0000unknown", "gpt-4o"):
        with pytest.raises(openai.NotFoundError) as info:
            other.chat.completions.create(model=model, messages=MESSAGES)
        assert info.value.status_code == 404 and info.value.code == "model_not_found" and info.value.param == "model"
        assert info.value.body["type"] == "invalid_request_error" and model in info.value.message
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=adapter_id, prompt="x")
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=f"{url}/v1", api_key="rlk_wrong", max_retries=0).chat.completions.create(model="tiny", messages=MESSAGES)
    assert info.value.body["type"] == "authentication_error"


BAD_CHAT = [
    ({"n": 2}, "n"),
    ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 1100}]}, "messages"),
]


@pytest.mark.parametrize("change, param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_requests_are_400_naming_the_parameter(served, http, change, param):
    _, _, _, _, adapter_id = served
    body = {"model": adapter_id, "messages": MESSAGES, **change}
    error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error
    assert error["message"]


def test_n_2_is_refused_through_the_client(served, client):
    _, _, _, _, adapter_id = served
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=adapter_id, messages=MESSAGES, n=2)
    assert info.value.param == "n" and "only 1" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=adapter_id, prompt=["a", "b"])


def test_a_405_and_a_missing_body_on_the_openai_routes_are_in_openais_shape(http):
    response = http.get("/v1/chat/completions")
    assert openai_error(response, 405)["code"] == "method_not_allowed" and response.headers["allow"] == "POST"
    assert openai_error(http.post("/v1/chat/completions"), 400)["param"] == "body"


# --- models and files --------------------------------------------------------------------------


def test_models_lists_base_models_and_the_tenants_adapters(served, client):
    _, app, _, tenant_id, adapter_id = served
    models = client.models.list().data
    assert all(isinstance(m, openai.types.Model) for m in models)
    by_id = {m.id: m for m in models}
    assert by_id["tiny"].owned_by == "system" and by_id["tiny"].created > 0
    assert by_id[adapter_id].owned_by == tenant_id and by_id[adapter_id].created > 0 and by_id[adapter_id].model_extra["parent"] == "tiny"
    assert client.models.retrieve(adapter_id).id == adapter_id and client.models.retrieve("tiny").id == "tiny"
    _, other = new_tenant(app, "models")
    with TestClient(app) as test_client:
        listed = test_client.get("/v1/models", headers=other).json()["data"]
    assert [m["id"] for m in listed] == ["tiny"]


def test_files_are_openai_file_objects(served, client):
    uploaded = client.files.create(file=("add.jsonl", dataset(6).encode()), purpose="fine-tune")
    assert isinstance(uploaded, openai.types.FileObject)
    assert uploaded.object == "file" and uploaded.purpose == "fine-tune" and uploaded.status == "processed"
    assert isinstance(uploaded.created_at, int) and uploaded.bytes == len(dataset(6).encode()) and uploaded.filename == "add.jsonl"
    assert client.files.retrieve(uploaded.id).created_at == uploaded.created_at
    listed = client.files.list()
    assert uploaded.id in [f.id for f in listed.data] and listed.has_more is False
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.files.create(file=("add.jsonl", dataset(6).encode()), purpose="assistants")
    assert "purpose" in info.value.message


def test_the_openapi_document_describes_the_openai_routes(http):
    document = http.get("/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}]
    content = chat["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "ChatCompletionChunk" in document["components"]["schemas"]
    assert chat["responses"]["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    listing = document["paths"]["/v1/fine_tuning/jobs"]["get"]
    assert [p["schema"]["maximum"] for p in listing["parameters"] if p["name"] == "limit"] == [100]


# --- the TGI routes through the real clients ---------------------------------------------------


def test_text_generation_client(served):
    text_generation = pytest.importorskip("text_generation")
    url, _, headers, _, _ = served
    client = text_generation.Client(url, headers=headers, timeout=60)  # TGI's client names no adapter: the base model
    response = client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True)
    assert isinstance(response, text_generation.types.Response) and response.details.generated_tokens <= 8
    assert response.details.prefill[0].logprob is None and len(response.details.tokens) == response.details.generated_tokens
    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert all(isinstance(e, text_generation.types.StreamResponse) for e in events)
    assert events[-1].generated_text == response.generated_text and events[-1].details.generated_tokens == response.details.generated_tokens
    with pytest.raises(text_generation.errors.ValidationError):
        client.generate(PROMPT, max_new_tokens=8, temperature=-1.0)
    with pytest.raises(text_generation.errors.ValidationError):
        list(client.generate_stream(PROMPT, max_new_tokens=8, top_p=1.5))
    with pytest.raises(text_generation.errors.UnknownError, match="invalid API key"):  # TGI has no 401 of its own
        text_generation.Client(url, headers={"Authorization": "Bearer rlk_wrong"}).generate(PROMPT)


def test_lorax_client(served):
    lorax = pytest.importorskip("lorax")
    url, _, headers, _, adapter_id = served
    client = lorax.Client(url, headers=headers, timeout=60)
    response = client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=8, details=True)
    assert isinstance(response, lorax.types.Response) and response.details.prompt_tokens == len(PROMPT.encode()) + 1
    events = list(client.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=8))
    assert all(isinstance(e, lorax.types.StreamResponse) for e in events)
    last = events[-1]
    assert last.generated_text == response.generated_text
    assert last.details.prompt_tokens == response.details.prompt_tokens and last.details.generated_tokens == response.details.generated_tokens
    with pytest.raises(lorax.errors.ValidationError):
        client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=0)
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id="ad-0000unknown", max_new_tokens=8)


def test_huggingface_hub_inference_client(served):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import ValidationError as HubValidationError  # noqa: N814

    url, _, headers, _, adapter_id = served
    client = huggingface_hub.InferenceClient(base_url=url, api_key=headers["Authorization"].split()[1], timeout=60)
    output = client.text_generation(PROMPT, adapter_id=adapter_id, max_new_tokens=8, details=True)
    assert isinstance(output, huggingface_hub.TextGenerationOutput) and output.details.generated_tokens <= 8
    events = list(client.text_generation(PROMPT, adapter_id=adapter_id, max_new_tokens=8, details=True, stream=True))
    assert all(isinstance(e, huggingface_hub.TextGenerationStreamOutput) for e in events)
    assert events[-1].generated_text == output.generated_text and events[-1].details.input_length == len(PROMPT.encode()) + 1
    with pytest.raises(HubValidationError):
        client.text_generation(PROMPT, adapter_id=adapter_id, max_new_tokens=8, temperature=-1.0)
    chat = huggingface_hub.InferenceClient(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1], timeout=60)
    reply = chat.chat_completion(MESSAGES, model=adapter_id, max_tokens=6, temperature=0)
    assert isinstance(reply, huggingface_hub.ChatCompletionOutput) and reply.choices[0].message.role == "assistant"


def test_a_chat_stream_that_fails_after_it_began_sends_an_openai_error_event(served, client, monkeypatch):
    _, app, _, _, adapter_id = served
    from service.api.inference import get_engine

    runner = get_engine(app).base_model("tiny")

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "_decode_step", broken_step)  # the prefill's token goes out, then this
    stream = client.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=8, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "failed" in info.value.message
    monkeypatch.undo()


def test_json_bodies_of_the_sse_events_are_compact(served, http):
    _, _, _, _, adapter_id = served
    with http.stream("POST", "/v1/chat/completions", json={"model": adapter_id, "messages": MESSAGES, "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"
