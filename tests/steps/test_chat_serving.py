"""steps/chat_serving.py and the chat side of steps/registry.py and steps/serve.py: payloads, the
greedy reference, the parity verdict, and the serving check that holds a candidate back."""

from __future__ import annotations

import pytest

from steps.chat_serving import (
    ParityCheck,
    Reply,
    answer_text,
    ask,
    generate_reply,
    parity_verdict,
    request_body,
    served_form,
)

pytestmark = pytest.mark.unit

HELLO = [{"role": "user", "content": "What is a for loop?"}]


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def test_request_bodies_are_openai_chat_or_completions():
    assert request_body(HELLO, 16) == {"messages": HELLO, "max_tokens": 16, "temperature": 0.0}
    assert request_body("The for", 8, 0.5) == {
        "prompt": "The for",
        "max_tokens": 8,
        "temperature": 0.5,
    }


CHAT_ANSWER = {"object": "chat.completion", "choices": [{"message": {"content": "It loops."}}]}


@pytest.mark.parametrize(
    "answer",
    [CHAT_ANSWER, [CHAT_ANSWER], {"predictions": [CHAT_ANSWER]}],
    ids=["dict", "list", "predictions"],
)
def test_answer_text_reads_a_chat_message(answer):
    assert answer_text(answer) == "It loops."
    assert answer_text({"choices": [{"text": " over items"}]}) == " over items"


def test_ask_posts_a_chat_request_at_temperature_0(completion_server):
    url, state = completion_server
    state["answer"] = [CHAT_ANSWER]
    assert ask(url, HELLO, 12) == "It loops."
    [request] = state["requests"]
    assert request["path"] == "/invocations"
    assert request["body"] == {"messages": HELLO, "max_tokens": 12, "temperature": 0.0}


def test_a_tokenizer_with_a_chat_template_is_served_as_chat_and_greedy(chat_model, tiny_model):
    from steps.registry import inference_config, serving_task

    assert serving_task(chat_model[1]) == "llm/v1/chat"
    assert serving_task(tiny_model[1]) == "llm/v1/completions"
    assert inference_config("llm/v1/chat") == {"do_sample": False, "add_special_tokens": False}
    assert inference_config("llm/v1/completions") == {"do_sample": False}


def test_the_chat_config_keeps_a_bos_tokenizer_from_adding_a_second_bos(tiny_chat_model_dir):
    """MLflow renders the template to text and the pipeline tokenizes it again: with the
    tokenizer's default (add BOS) a template that writes BOS itself would get two."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_greedy_reply_is_reproducible_and_reports_the_budget(chat_model):
    import torch

    model, tokenizer = chat_model
    ids = tokenizer.apply_chat_template(
        HELLO, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    plain = model.generate(**ids, max_new_tokens=6, do_sample=False)[0].tolist()
    streamed: list[str] = []
    torch.manual_seed(0)
    first = generate_reply(model, tokenizer, HELLO, 6, on_text=streamed.append)
    torch.manual_seed(1)
    assert generate_reply(model, tokenizer, HELLO, 6) == first  # no randomness at temperature 0
    assert first.prompt_ids + first.new_ids == plain
    assert first.text == tokenizer.decode(plain[len(first.prompt_ids) :], skip_special_tokens=True)
    assert "".join(streamed) == first.text
    assert len(first.new_ids) == 6 and not first.ended  # the tiny model never ends its turn


def test_a_reply_ends_at_an_end_of_turn_id_of_the_generation_config(chat_model):
    import copy

    model, tokenizer = chat_model
    first = generate_reply(model, tokenizer, HELLO, 6).new_ids[0]
    ending = copy.deepcopy(model)
    ending.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    reply = generate_reply(ending, tokenizer, HELLO, 6)
    assert reply.new_ids == [first] and reply.ended


def test_a_temperature_above_0_samples(chat_model):
    import torch

    model, tokenizer = chat_model
    replies = set()
    for seed in range(3):
        torch.manual_seed(seed)
        replies.add(tuple(generate_reply(model, tokenizer, HELLO, 8, temperature=1.0).new_ids))
    assert len(replies) > 1


def test_served_form_is_mlflows_cut_and_strip(chat_model):
    _, tokenizer = chat_model
    prompt = tokenizer.encode("The for statement", add_special_tokens=False)
    new = tokenizer.encode("  is used to iterate", add_special_tokens=False)
    reply = Reply(text="", prompt_ids=prompt, new_ids=[*new, tokenizer.eos_token_id], ended=True)
    assert served_form(tokenizer, reply) == "is used to iterate"


def check(served: list[str], expected: str = "It loops.", ended: bool = True) -> ParityCheck:
    return ParityCheck(HELLO, served, expected, ended)


def test_parity_passes_on_equal_text_and_reports_answers_cut_at_the_budget():
    ok, reason = parity_verdict([check(["It loops."]), check(["It loops."] * 2)], 32, "<|im_end|>")
    assert ok and reason == (
        "served answers equal in-process greedy generation for 2 of 2 prompts; "
        "all ended at <|im_end|> within 32 tokens"
    )
    cut = [check(["It loops."]), check(["It"], "It", ended=False)]
    assert parity_verdict(cut, 32, "<|im_end|>") == (
        True,
        "served answers equal in-process greedy generation for 2 of 2 prompts; "
        "1 of 2 hit the 32-token budget before <|im_end|>",
    )
    assert parity_verdict(cut, 32, "<|im_end|>", require_end=True)[0] is False


def test_parity_fails_on_any_different_answer_in_one_line():
    checks = [check(["It loops."]), check(["It loops.", "It loops!"])]  # asked twice: two answers
    ok, reason = parity_verdict(checks, 32, "<|im_end|>")
    assert not ok and reason == (
        "served answers differ from in-process greedy generation for 1 of 2 prompts; "
        "prompt 2 'What is a for loop?': served 'It loops!', expected 'It loops.'"
    )


def test_a_parity_failure_holds_the_candidate_back_like_the_latency_budget():
    from steps.serve import within_budget

    parity = {"ok": True, "reason": "served answers equal …", "prompts": 1}
    report = {"task": "llm/v1/chat", "requests": 5, "p95_ms": 120.4, "parity": parity}
    assert within_budget(report, None) == (
        True,
        "served 5 chat answers, p95 120 ms (no budget); served answers equal …",
    )
    failed = {**report, "parity": {**parity, "ok": False, "reason": "served answers differ …"}}
    assert within_budget(failed, 150) == (
        False,
        "not served as generated: served answers differ …",
    )
    assert within_budget(failed, 100) == (False, "too slow: p95 120 ms > serve.max_p95_ms 100")


def test_smoke_prompts_must_fit_the_task():
    from steps.serve import check_prompts

    assert check_prompts([HELLO], "llm/v1/chat") == [HELLO]
    with pytest.raises(ValueError, match="smoke prompt 1: a llm/v1/chat model is asked a list"):
        check_prompts(["The for"], "llm/v1/chat")
    with pytest.raises(ValueError, match="smoke prompt 2: a llm/v1/completions model is asked"):
        check_prompts(["The for", HELLO], "llm/v1/completions")
    answered = [*HELLO, {"role": "assistant", "content": "It loops."}]
    with pytest.raises(ValueError, match="must end before an assistant turn"):
        check_prompts([answered], "llm/v1/chat")
