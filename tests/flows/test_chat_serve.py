"""Chat models end to end: registered as llm/v1/chat, served by the stock `mlflow models serve`
(OpenAI chat payloads, greedy at temperature 0, equal to in-process generation), and `llmpipe chat`
answering a piped conversation. One scoring server for the module; smoke_serve starts its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from steps.chat_serving import check_parity, end_of_turn_name, parity_verdict
from steps.serve import SMOKE_MESSAGES, scoring_server, smoke_serve

pytestmark = pytest.mark.integration

LLMPIPE = Path(sys.executable).parent / "llmpipe"
CHAT, PLAIN = "models:/chat@challenger", "models:/plain@challenger"
BUDGET = 16  # new tokens per answer
PROMPTS = [
    [{"role": "user", "content": "What is a for loop?"}],
    [{"role": "user", "content": "What does raise do?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Explain the while statement."},
    ],
]


SMOKE_PROMPTS = [SMOKE_MESSAGES, *PROMPTS[1:]]  # what the smoke test below asks the chat model


def talkative_chat_model(src: Path, dest: Path) -> Path:
    """The tiny chat model made to say something and sometimes end its turn.

    At its initial scale (std 0.02) the residual stream is the input embedding, so greedy decoding
    repeats the prompt's last token ('\\n') for ever. Its layer matrices are redrawn at std 0.3, and
    `<|im_end|>`'s (tied) embedding becomes 1.2 x that of ' definition': wherever the model would
    say ' definition' it ends its turn instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=draw) * 0.3)
        [word] = tokenizer.encode(" definition", add_special_tokens=False)
        embedding = model.get_input_embeddings().weight
        embedding[tokenizer.eos_token_id] = 1.2 * embedding[word]
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def greedy(model_dir: Path, messages: list[dict], budget: int = BUDGET) -> tuple[str, bool]:
    """Plain transformers, for reference: the chat template, generate(do_sample=False), the new
    tokens decoded; and whether the answer ended at <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=budget, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new[-1]) == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_chat_model_dir, tiny_model_dir):
    """A sqlite registry holding the talkative chat model (`chat`) and the tiny completions model
    (`plain`), each logged and registered as the register step does it (alias challenger)."""
    from mlflow import MlflowClient

    from steps.registry import log_and_register

    root = tmp_path_factory.mktemp("chat-registry")
    talkative = talkative_chat_model(tiny_chat_model_dir, root / "talkative")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("llmpipe", artifact_location=(root / "art").as_uri())
    with pytest.MonkeyPatch.context() as env:  # as inside a flow run: log into that run
        env.setenv("MLFLOW_TRACKING_URI", uri)
        for name, model_dir in (("chat", talkative), ("plain", tiny_model_dir)):
            env.setenv("MLFLOW_RUN_ID", client.create_run(experiment).info.run_id)
            # the chat model's greedy replies are recorded as register records them; plain's not
            replies_to = (lambda task: (SMOKE_PROMPTS, BUDGET)) if name == "chat" else None
            log_and_register(uri, name, model_dir, {"model_hash": name}, replies_to=replies_to)
    import mlflow

    mlflow.set_tracking_uri(None)
    return uri, talkative


@pytest.fixture(scope="module")
def chat_server(registry, tmp_path_factory):
    """The chat model behind the stock scoring server on a free loopback port: its URL."""
    uri, _ = registry
    log = tmp_path_factory.mktemp("chat-server") / "server.log"
    with scoring_server(CHAT, uri, log, timeout=300) as server:
        yield server.url


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    return answer[0] if isinstance(answer, list) else answer


def test_a_chat_model_is_registered_as_chat_and_greedy(registry, tmp_path):
    from mlflow.models import Model

    from steps.serve import download_model, registered_task

    uri, _ = registry
    for model_uri, task in ((CHAT, "llm/v1/chat"), (PLAIN, "llm/v1/completions")):
        assert registered_task(uri, model_uri) == task
        flavors = Model.load(str(download_model(model_uri, uri, tmp_path / task))).flavors
        assert flavors["python_function"]["config"]["do_sample"] is False


def test_an_openai_chat_request_answers_with_a_message(chat_server):
    answer = post(chat_server, {"messages": PROMPTS[0], "max_tokens": BUDGET, "temperature": 0})
    assert answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()


def test_temperature_0_is_greedy_and_equals_in_process_generation(chat_server, registry):
    """Twice the same answer, the one plain transformers generates greedily (MLflow strips its
    leading whitespace); the server's default and a temperature above 0 decode greedily too."""
    _, talkative = registry
    expected, _ = greedy(talkative, PROMPTS[2])
    answers = [
        post(chat_server, {"messages": PROMPTS[2], "max_tokens": BUDGET, **extra})["choices"][0]
        for extra in ({"temperature": 0}, {"temperature": 0.0}, {}, {"temperature": 0.9})
    ]
    assert [a["message"]["content"] for a in answers] == [expected.lstrip()] * 4
    assert expected.strip()


def test_parity_with_in_process_generation_holds_and_can_fail(chat_server, registry):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, talkative = registry
    model = AutoModelForCausalLM.from_pretrained(talkative)
    tokenizer = AutoTokenizer.from_pretrained(talkative)
    checks = check_parity(chat_server, model, tokenizer, PROMPTS, BUDGET)
    ended = [greedy(talkative, p)[1] for p in PROMPTS]
    assert [c.ended for c in checks] == ended and True in ended and False in ended
    ok, reason = parity_verdict(checks, BUDGET, end_of_turn_name(model, tokenizer))
    cut = ended.count(False)
    assert ok and reason == (
        "served answers equal in-process greedy generation for 3 of 3 prompts; "
        f"{cut} of 3 hit the {BUDGET}-token budget before <|im_end|>"
    )
    assert not parity_verdict(checks, BUDGET, "<|im_end|>", require_end=True)[0]

    other_model = AutoModelForCausalLM.from_pretrained(talkative)
    other_model.model.norm.weight.data.mul_(-1)  # a different model answers differently
    other = check_parity(chat_server, other_model, tokenizer, PROMPTS[:1], BUDGET)
    ok, reason = parity_verdict(other, BUDGET, "<|im_end|>")
    assert not ok and reason.startswith(
        "served answers differ from in-process greedy generation for 1 of 1 prompts; "
        "prompt 1 'What is a for loop?': served "
    )


def test_smoke_serve_asks_a_chat_model_chat_requests(registry):
    uri, talkative = registry
    # the built-in prompt first (its answer is the one reported), then the two given: one request
    # each, though 2 were asked for
    report = smoke_serve(CHAT, uri, requests=2, prompts=PROMPTS[1:], max_tokens=BUDGET)
    assert report["task"] == "llm/v1/chat" and report["requests"] == 3
    assert report["prompt"] == SMOKE_MESSAGES[-1]["content"]
    assert report["completion"] == greedy(talkative, SMOKE_MESSAGES)[0].lstrip()
    assert report["parity"]["ok"] and report["parity"]["prompts"] == 3
    assert report["parity"]["reference"] == "3 recorded at registration, 0 generated here"


def test_the_replies_recorded_at_registration_are_the_reference_where_they_apply(
    registry, tmp_path, monkeypatch
):
    """A version's recorded replies are what the served answers must equal (a record that does not
    match the model fails the check); made with another budget, or for another place (here: other
    GPUs visible), they are not used."""
    import yaml
    from mlflow import MlflowClient

    from steps.registry import RECORDED_REPLIES, log_and_register
    from steps.serve import recorded_replies, version_location

    uri, talkative = registry
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llmpipe").experiment_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(experiment).info.run_id)
    mv = log_and_register(uri, "tampered", talkative, {"model_hash": "tampered"},
                          replies_to=lambda task: (SMOKE_PROMPTS[:1], BUDGET))  # fmt: skip
    monkeypatch.delenv("MLFLOW_RUN_ID")
    mlmodel = Path(version_location(uri, f"models:/tampered/{mv.version}").removeprefix("file://"))
    mlmodel = mlmodel / "MLmodel"
    logged = yaml.safe_load(mlmodel.read_text())
    [reply] = logged["metadata"][RECORDED_REPLIES]["replies"].values()
    assert reply["text"] == greedy(talkative, SMOKE_MESSAGES)[0].lstrip()
    reply["text"] = "not what the model says"
    mlmodel.write_text(yaml.safe_dump(logged))

    report = smoke_serve(f"models:/tampered/{mv.version}", uri, max_tokens=BUDGET)
    assert not report["parity"]["ok"] and report["parity"]["reason"].endswith(
        "expected 'not what the model says'"
    )
    assert report["parity"]["reference"] == "1 recorded at registration, 0 generated here"

    # Not used when made with another budget or at another place: smoke_serve then generates the
    # replies from the logged model (test_a_completions_model_still_serves_greedy_completions)
    assert recorded_replies(mlmodel, BUDGET) is not None
    assert recorded_replies(mlmodel, BUDGET - 1) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides no GPU here, but is another place
    assert recorded_replies(mlmodel, BUDGET) is None


def test_a_completions_model_still_serves_greedy_completions(registry, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri, _ = registry
    report = smoke_serve(PLAIN, uri, requests=2, max_tokens=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(report["prompt"], return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert report["task"] == "llm/v1/completions"
    assert report["completion"] == tokenizer.decode(new, skip_special_tokens=True).lstrip()
    assert report["parity"] == {
        "ok": True,
        "reason": "served answers equal in-process greedy generation for 1 of 1 prompts; "
        "1 of 1 hit the 8-token budget before </s>",
        "prompts": 1,
        "reference": "0 recorded at registration, 1 generated here",
    }


# -- llmpipe chat --------------------------------------------------------------------------------


def chat_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_llmpipe_chat_answers_piped_turns_with_the_history(registry, tmp_path):
    """Each line is a user turn; each answer is greedy generation given every turn before it."""
    _, talkative = registry
    questions = ["What is a for loop?", "And a while loop?"]
    done = subprocess.run([LLMPIPE, "chat", "--model", str(talkative), "--max-new-tokens",
                           str(BUDGET)], input="\n".join(questions) + "\n", capture_output=True,
                          text=True, cwd=tmp_path, env=chat_env(), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    history, expected = [], ""
    for question in questions:
        history.append({"role": "user", "content": question})
        answer, _ = greedy(talkative, history)
        history.append({"role": "assistant", "content": answer})
        expected += answer + "\n"
    assert done.stdout == expected and history[1]["content"] != history[3]["content"]
    assert "Traceback" not in done.stderr


def test_llmpipe_chat_talks_to_a_registered_model_and_ends_on_ctrl_c_with_130(registry):
    _, talkative = registry
    project = talkative.parent  # where mlflow.db lies
    proc = subprocess.Popen([LLMPIPE, "chat", "--model", CHAT, "--max-new-tokens", str(BUDGET)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=project, env=chat_env())  # fmt: skip
    try:
        proc.stdin.write(b"What is a for loop?\n")
        proc.stdin.flush()
        expected = (greedy(talkative, PROMPTS[0])[0] + "\n").encode()
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.read(len(expected))))
        reader.start()
        reader.join(timeout=300)  # the answer is out (slow on busy cores): it waits for more
        assert got == [expected]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_llmpipe_chat_names_a_missing_alias_or_champion(registry):
    from flows.chat import model_source
    from steps.errors import UserError

    _, talkative = registry
    project = talkative.parent
    assert model_source(CHAT, project) == CHAT
    with pytest.raises(UserError) as alias:
        model_source("models:/chat@nope", project)
    assert str(alias.value) == "--model models:/chat@nope: no such alias; see `llmpipe models`"
    (project / "params.yaml").write_text("register:\n  model_name: chat\n")
    with pytest.raises(UserError) as champion:
        model_source(None, project)
    assert str(champion.value) == (
        "registered model 'chat' has no champion yet; run `llmpipe run` first"
    )


def test_llmpipe_chat_refuses_a_model_without_a_chat_template(tiny_model_dir, tmp_path):
    done = subprocess.run([LLMPIPE, "chat", "--model", str(tiny_model_dir)], input="hi\n",
                          capture_output=True, text=True, cwd=tmp_path, env=chat_env(),
                          timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"error: {tiny_model_dir}: its tokenizer has no chat template, so it cannot chat "
        "(score it with `llmpipe perplexity`, or pick a chat model, e.g. an -Instruct one)\n"
    )
