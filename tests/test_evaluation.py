import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from arr import evaluation as ev
from arr import resources
from arr.chunked_loss import kl_from_logprobs
from conftest import sft_records, write_jsonl


def test_continuation_logprobs_are_shifted_and_ignore_padding(llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    short = ([5, 6], [7])
    long = ([5, 6, 9, 10], [11, 12, 13])
    (s_short, n_short), (s_long, n_long) = ev.continuation_logprobs(model, tokenizer, [short, long], 2, "t")
    assert (n_short, n_long) == (1, 3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5, 6, 9, 10, 11, 12, 13]])).logits[0], -1)
        alone = torch.log_softmax(model(torch.tensor([[5, 6, 7]])).logits[0], -1)
    # token t is scored by the logits at t - 1
    assert s_long == pytest.approx((logp[3, 11] + logp[4, 12] + logp[5, 13]).item(), abs=1e-5)
    assert s_short == pytest.approx(alone[1, 7].item(), abs=1e-5)  # the padded row scores as if alone


def test_accuracy_length_normalisation():
    items = [("q", ["a", "b"], 1), ("q", ["a", "b"], 0)]
    # item 1: sums (-2 over 1 token, -3 over 3 tokens): normalised -2 vs -1 -> picks b (right); raw picks a
    # item 2: (-1/1, -4/2) -> a either way (right)
    scores = [(-2.0, 1), (-3.0, 3), (-1.0, 1), (-4.0, 2)]
    assert ev._accuracy(scores, items, normalise=True) == 1.0
    assert ev._accuracy(scores, items, normalise=False) == 0.5
    assert ev._nll([(-3.0, 2), (-1.0, 2)]) == 1.0


def test_packaged_probe_data_is_disjoint_from_replay():
    assert len(ev.mmlu_questions(1000, 0)) == 281  # 282 samples ship; one answers "(E)" with four choices
    assert len(ev.chat_exchanges(100, 0)) == 100
    replay_texts = {r["extract"] for r in resources.wiki_split("replay")}
    replay_titles = {r["title"] for r in resources.wiki_split("replay")}
    assert not set(ev.heldout_documents(10_000, 0)) & replay_texts
    for prompt, choices, right in ev.knowledge_questions(200, 0):
        title = prompt.removeprefix("Question: What is ").removesuffix("?\nAnswer:")
        assert title not in replay_titles and len(choices) == 4 and 0 <= right < 4


def test_behaviour_kl_is_zero_for_the_initial_model_and_grows_with_the_adapter(llama_dir, tokenizer):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")).eval()
    args = ev.EvalArgs(drift_prompts=3, drift_tokens=6)
    with model.disable_adapter():
        answers = ev.greedy_answers(model, tokenizer, list(ev.GENERAL_PROMPTS[:3]), 6, 2)
    assert all(1 <= len(a) <= 6 for a in answers)
    assert ev.behaviour_kl(model, tokenizer, answers, model.disable_adapter, args) == pytest.approx(0, abs=1e-7)
    kls = []
    for scale in (0.05, 0.2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=scale, generator=torch.Generator().manual_seed(1))
        kls.append(ev.behaviour_kl(model, tokenizer, answers, model.disable_adapter, args))
    assert 0 < kls[0] < kls[1]
    total, count = 0.0, 0  # the batched, head-sliced probe against one prompt at a time through full logits
    with torch.no_grad():
        for prompt, answer in zip(ev.GENERAL_PROMPTS[:3], answers):
            context = ev.chat_prompt_ids(tokenizer, prompt)
            ids = torch.tensor([context + answer])
            logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
            with model.disable_adapter():
                ref_logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
            kl = kl_from_logprobs(logits.log_softmax(-1), ref_logits.log_softmax(-1), "forward")
            total, count = total + kl.sum().item(), count + kl.numel()
    assert kls[1] == pytest.approx(total / count, rel=1e-4)


def test_greedy_answers_batched_by_length_keep_the_prompt_order(llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompts = ["Hi", "Tell me a long story about the sea and ships", "What?"]
    batched = ev.greedy_answers(model, tokenizer, prompts, 5, 2)
    assert batched == [ev.greedy_answers(model, tokenizer, [p], 5, 1)[0] for p in prompts]


def test_headline_forgetting_and_table():
    result = {"before": {"heldout_nll": 3.0, "knowledge_mc": 0.725, "mmlu": 0.28, "chat_nll": 2.0, "behaviour_kl": 0.0},
              "after": {"heldout_nll": 2.0, "knowledge_mc": 0.70, "mmlu": 0.3, "chat_nll": 2.5, "behaviour_kl": 0.4},
              "items": {"knowledge_mc": 320, "mmlu": 24}}
    result["delta"] = {k: result["after"][k] - result["before"][k] for k in result["after"]}
    result["forgetting"] = ev.headline_forgetting(result["delta"])
    assert math.isclose(result["forgetting"], (0 + 0.5 + 0.4) / 3)  # the held-out gain does not cancel the damage
    rows = {line.split()[0]: line for line in ev.format_table(result).splitlines() if line}
    # units in words, the change beside a relative change; accuracies in points, with their 95% interval
    assert "chat answers, NLL" in rows["chat_nll"] and "+0.5000 nats/token" in rows["chat_nll"]
    assert "+25.0%" in rows["chat_nll"] and "-33.3%" in rows["heldout_nll"]
    assert "-2.5 points" in rows["knowledge_mc"] and "±5.0 points at 95%, 320 items" in rows["knowledge_mc"]
    # MMLU at 28% over 24 questions: within 25% +- 17 points, flagged as at chance, not presented as a score
    assert "at chance for this model" in rows["mmlu"] and "at chance" not in rows["knowledge_mc"]
    assert "+0.3000 nats/token" in rows["forgetting"] and "task_em" not in rows  # a probe that did not run: no row
    learned = {**result, "before": {**result["before"], "task_em": 0.003}, "after": {**result["after"], "task_em": 0.9},
               "delta": {**result["delta"], "task_em": 0.897}, "items": {**result["items"], "task_em": 300}}
    task_row = next(line for line in ev.format_table(learned).splitlines() if line.startswith("task_em"))
    assert "+89.7 points" in task_row and "%" not in task_row.split("points")[1]  # no relative change from 0.3%
    table = ev.format_table(result)
    assert "For scale: +0.2481 for plain LoRA on the embedded default recipe" in " ".join(table.split())
    assert "+0.1000 for plain LoRA in this comparison" in " ".join(
        ev.format_table(result, (0.1, "plain LoRA in this comparison")).split())


def test_the_reference_lora_figure_is_the_published_one():
    published = json.loads((Path(__file__).parents[1] / "docs/results/default.json").read_text())
    assert ev.REFERENCE_LORA[0] == round(published["methods"]["lora"]["forgetting"], 4)


def test_probes_of_size_zero_do_not_run_and_each_before_is_cached_by_its_own_settings(
        tmp_path, monkeypatch, llama_dir, tokenizer):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    calls = []
    run_probe = ev.run_probe
    monkeypatch.setattr(ev, "run_probe", lambda name, *a, **k: calls.append(name) or run_probe(name, *a, **k))
    small = dict(heldout_docs=2, knowledge_items=2, mmlu_items=0, chat_items=2, drift_prompts=2, drift_tokens=3,
                 task_items=2, batch_size=4)
    tasks = [write_jsonl(tmp_path / f"task{i}.jsonl", sft_records(2 + i)) for i in range(2)]
    result = ev.evaluate_adapter(model, tokenizer, ev.EvalArgs(**small, task_data=tasks[0]), cache_before=True)
    assert set(result["after"]) == {"heldout_nll", "knowledge_mc", "chat_nll", "behaviour_kl", "task_nll", "task_em"}
    assert result["items"] == {"knowledge_mc": 2, "task_em": 2}
    before = ["heldout_nll", "knowledge_mc", "chat_nll", "behaviour_kl", "task"]
    assert calls == before * 2  # before (adapter off), then after
    calls.clear()  # another task file: only the task's "before" runs again
    ev.evaluate_adapter(model, tokenizer, ev.EvalArgs(**small, task_data=tasks[1]), cache_before=True)
    assert calls == ["task"] + before
    calls.clear()  # another size of one probe: that probe's
    ev.evaluate_adapter(model, tokenizer, ev.EvalArgs(**{**small, "chat_items": 3}, task_data=tasks[1]),
                        cache_before=True)
    assert calls == ["chat_nll"] + before


def test_next_token_logprobs_read_the_last_real_position(llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    rows = ev.next_token_logprobs(model, tokenizer, [[5, 6], [5, 6, 9, 10]], [7, 8], 2, "t")
    with torch.no_grad():
        short = torch.log_softmax(model(torch.tensor([[5, 6]])).logits[0, -1], -1)
        long = torch.log_softmax(model(torch.tensor([[5, 6, 9, 10]])).logits[0, -1], -1)
    torch.testing.assert_close(torch.tensor(rows), torch.stack([short[[7, 8]], long[[7, 8]]]), atol=1e-5, rtol=0)


def test_task_examples_from_a_user_file_take_the_last_assistant_turn(tmp_path):
    from conftest import chat, write_jsonl

    path = write_jsonl(tmp_path / "task.jsonl", [
        chat("Reverse: a b", " b a ", system="Be terse."),
        {"instruction": "Upper-case", "input": "xy", "output": "XY"},
        {"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "2?"}, {"role": "assistant", "content": "two"}]},
    ])
    examples = ev.task_examples(path, 10)
    assert examples[0] == ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse: a b"}],
                           "b a")
    assert examples[1] == ([{"role": "user", "content": "Upper-case\n\nxy"}], "XY")
    assert [t["content"] for t in examples[2][0]] == ["1?", "one", "2?"] and examples[2][1] == "two"
    assert len(ev.task_examples(path, 2)) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), {"question": "no answer"}])
    with pytest.raises(ev.DataError, match=r"bad.jsonl:2: no known fields"):
        ev.task_examples(bad, 10)


def test_lm_eval_task_on_the_in_memory_model_matches_hand_loglikelihoods(tmp_path, llama_dir, tokenizer):
    import json

    import yaml

    docs = [{"question": f"What is {i} plus {i}?", "choices": [f"It is {2 * i}.", f"It is {i}.", "Paris."],
             "answer": i % 3} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arr_tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "arr_tiny_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mc.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")).eval()
    args = ev.EvalArgs(lm_eval_tasks=["arr_tiny_mc"], lm_eval_include_path=str(tmp_path / "tasks"), batch_size=4)

    def hand_accuracy():  # lm-eval's multiple choice: sum log p(" " + choice | question), argmax
        pairs = [(ev.encode(tokenizer, d["question"]), ev.encode(tokenizer, " " + c)) for d in docs for c in d["choices"]]
        items = [(d["question"], d["choices"], d["answer"]) for d in docs]
        return ev._accuracy(ev.continuation_logprobs(model, tokenizer, pairs, 4, "t"), items, normalise=False)

    with model.disable_adapter():
        before, expected_before = ev.lm_eval_scores(model, tokenizer, args), hand_accuracy()
    after, expected_after = ev.lm_eval_scores(model, tokenizer, args), hand_accuracy()
    assert before["lm_eval:arr_tiny_mc:acc"] == pytest.approx(expected_before)
    assert after["lm_eval:arr_tiny_mc:acc"] == pytest.approx(expected_after)
    # the folder's own task was indexed from the folder alone, not with the 14,000 lm-eval ships (most of a minute)
    assert ev.task_manager.cache_info().currsize == 1
    with pytest.raises(ev.ARRError, match="lm_eval_tasks"):
        ev.lm_eval_scores(model, tokenizer, ev.EvalArgs(lm_eval_tasks=["no_such_task_xyz"],
                                                        lm_eval_include_path=str(tmp_path / "tasks")))


def test_lm_eval_tasks_of_ones_own_folder_that_need_lm_evals_own_are_indexed_with_them(monkeypatch, llama_dir,
                                                                                      tokenizer, tmp_path):
    """A group in the user's folder may list tasks lm-eval ships: the folder-only index fails on it, and the full
    index is used instead."""
    from types import SimpleNamespace

    import lm_eval

    managers = {False: SimpleNamespace(all_tasks=["mine", "theirs"]), True: SimpleNamespace(all_tasks=["mine"])}
    used = []

    def simple_evaluate(task_manager, **kwargs):
        used.append(task_manager)
        if task_manager is managers[True]:
            raise KeyError("theirs")  # the group's member lm-eval ships
        return {"results": {"mine": {"acc,none": 0.5}}}

    monkeypatch.setattr(ev, "task_manager", lambda path, own_only=False: managers[own_only])
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    args = ev.EvalArgs(lm_eval_tasks=["mine"], lm_eval_include_path=str(tmp_path))
    assert ev.lm_eval_scores(model, tokenizer, args) == {"lm_eval:mine:acc": 0.5}
    assert used == [managers[True], managers[False]]


def test_self_replay_prompts_are_disjoint_from_every_probe():
    """The default prompts of replay_data=self never hold a held-out title, a behaviour_kl prompt's subject or a
    chatterbot question of chat_nll."""
    prompts = resources.self_replay_prompts()
    assert len(prompts) == 1024 and len(set(prompts)) == len(prompts)
    titles = {r["title"] for r in resources.wiki_records()}
    heldout = {r["title"] for r in resources.wiki_split("heldout")}
    asks = [ask.split("{}") for ask in resources.SELF_REPLAY_ASKS]
    subjects = [next(p[len(a):len(p) - len(b)] for a, b in asks if p.startswith(a) and p.endswith(b)) for p in prompts]
    assert set(subjects) <= titles and not set(subjects) & heldout
    probe_text = " ".join(ev.GENERAL_PROMPTS).lower()
    assert not any(s.lower() in probe_text for s in subjects)
    chat_questions = {q.lower() for q, _ in ev.chat_exchanges(10_000, 0)}
    assert len(chat_questions) > 100 and not {p.lower() for p in prompts} & chat_questions
