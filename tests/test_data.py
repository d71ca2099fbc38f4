import pytest
import torch

from arr import resources
from arr.data import (IGNORE_INDEX, Collator, MixedDataset, ReplayMixSampler, load_sft_examples, pack_replay,
                      attention_width, packed_rows)
from arr.errors import DataError
from conftest import make_tokenizer, write_jsonl


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_single_turn_trains_on_answer_and_end_of_turn_only(tokenizer):
    [ex] = load_sft_examples([{"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Capital of France?"},
                                            {"role": "assistant", "content": "Paris."}]}], tokenizer, 128)
    assert trained_text(tokenizer, ex) == "Paris.<|im_end|>"
    full = tokenizer.decode(ex["input_ids"])
    assert full.endswith("<|im_start|>assistant\nParis.<|im_end|>\n")  # the newline after the turn is not trained
    assert ex["labels"][-1] == IGNORE_INDEX


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
             {"role": "user", "content": "the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    [ex] = load_sft_examples([{"messages": turns}], tokenizer, 256)
    assert trained_text(tokenizer, ex) == "hello world<|im_end|>Paris.<|im_end|>"
    masked = tokenizer.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX])
    assert "the capital of France?" in masked and "user" in masked


def test_alpaca_and_prompt_completion_use_the_chat_template(tokenizer):
    alpaca, pc, msgs = load_sft_examples([
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"prompt": "Add\n\n1 and 2", "completion": "3"},
        {"messages": [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]},
    ], tokenizer, 128)
    assert alpaca == pc == msgs
    assert trained_text(tokenizer, alpaca) == "3<|im_end|>"


def test_plain_prompt_completion_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    [ex] = load_sft_examples([{"prompt": "Q: 2+2? A:", "completion": " 4"}], tok, 64)
    assert tok.decode(ex["input_ids"]) == "Q: 2+2? A: 4<|im_end|>"
    assert trained_text(tok, ex) == " 4<|im_end|>"


def test_truncation_keeps_the_start(tokenizer):
    [ex] = load_sft_examples([{"prompt": "hi", "completion": "the quick brown fox jumps over the lazy dog"}],
                             tokenizer, 14)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 14
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nhi")


@pytest.mark.parametrize("content, line, message", [
    ('{"messages": [}', 2, "invalid JSON"),
    ('{"text": "no known fields"}', 2, "no known fields"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', 2, "unknown role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', 2, "is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', 2, "no assistant turn"),
    ('{"instruction": "x"}', 2, "no known fields"),
    ('[1, 2]', 2, "expected a JSON object"),
    ('{"prompt": "' + "long prompt " * 40 + '", "completion": "y"}', 2, "no trainable"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer, content, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n' + content + "\n")
    with pytest.raises(DataError, match=rf"data\.jsonl:{line}: .*{message}"):
        load_sft_examples(str(path), tokenizer, 32)


def test_empty_missing_and_non_utf8_files(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_sft_examples(str(empty), tokenizer, 32)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_sft_examples(str(tmp_path / "missing.jsonl"), tokenizer, 32)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match="latin1.jsonl:2: not valid UTF-8"):
        load_sft_examples(str(bad), tokenizer, 32)


def test_chat_data_needs_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match="chat.jsonl:1: chat data needs a tokenizer with a chat template"):
        load_sft_examples(path, make_tokenizer(chat_template=None), 32)


@pytest.mark.parametrize("global_batch, ratio", [(8, 0.25), (8, 0.3), (6, 0.5), (16, 0.1)])
def test_replay_ratio_is_exact_and_deterministic(global_batch, ratio):
    sampler = ReplayMixSampler(n_sft=50, n_replay=7, global_batch=global_batch, ratio=ratio, seed=3)
    order = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order += list(sampler)
    steps = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    assert all(len(s) == global_batch for s in steps)
    replay_per_step = [sum(i >= 50 for i in s) for s in steps]
    exact = global_batch * ratio
    assert all(abs(c - exact) < 1 for c in replay_per_step)  # every step within one sequence of the ratio
    for n in range(1, len(steps) + 1):  # cumulative count is the rounded exact count
        assert abs(sum(replay_per_step[:n]) - n * exact) <= 0.5
    # each epoch's SFT draws cover the data set (no example starved), and the order is a function of the seed
    first_epoch_sft = [i for i in order[:len(sampler)] if i < 50]
    assert set(first_epoch_sft) == set(range(50))
    again = ReplayMixSampler(50, 7, global_batch, ratio, seed=3)
    assert list(again) == order[:len(sampler)]
    assert list(ReplayMixSampler(50, 7, global_batch, ratio, seed=4)) != order[:len(sampler)]


@pytest.mark.parametrize("global_batch, ratio, per_step", [(8, 0.125, 8 / 7), (8, 0.5, 8), (6, 0.2, 1.5)])
def test_added_replay_keeps_every_task_row_of_every_step(global_batch, ratio, per_step):
    """replay_mode=add: every step draws global_batch task rows, as plain LoRA does, in the same order as plain
    LoRA's draws of the task, and ratio / (1 - ratio) replay rows per task row on top (exact over the run); replay is
    still `ratio` of the rows drawn. Replay in place draws fewer task rows a step."""
    sampler = ReplayMixSampler(n_sft=50, n_replay=7, global_batch=global_batch, ratio=ratio, seed=3, added=True)
    order = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order += list(sampler)
    assert len(sampler) == global_batch * -(-50 // global_batch)  # an epoch is plain LoRA's: ceil(50 / g) steps
    steps = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    rows = [[j for item in step for j in (item if isinstance(item, tuple) else (item,))] for step in steps]
    task = [[j for j in step if j < 50] for step in rows]
    replay = [[j for j in step if j >= 50] for step in rows]
    assert all(len(t) == global_batch for t in task)  # every task row of every step
    assert all(isinstance(item, int) or item[0] < 50 <= min(item[1:]) for step in steps for item in step)
    assert all(abs(len(r) - per_step) < 1 for r in replay)
    for n in range(1, len(steps) + 1):  # cumulative replay count is the rounded exact count
        assert abs(sum(len(r) for r in replay[:n]) - n * per_step) <= 0.5
    total_replay = sum(map(len, replay))
    assert abs(total_replay / (total_replay + sum(map(len, task))) - ratio) < 0.01
    assert [j for t in task for j in t][:50] == [i for i in list(ReplayMixSampler(50, 7, global_batch, ratio, 3))
                                                 if i < 50][:50]  # the task's order is the in-place one's
    in_place = list(ReplayMixSampler(50, 7, global_batch, ratio, seed=3))
    assert sum(i < 50 for i in in_place[:global_batch * 4]) < 4 * global_batch
    # MixedDataset gives an item with riders as its rows, and the Collator batches them as rows
    dataset = MixedDataset([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]} for _ in range(50)],
                           torch.arange(7 * 4).reshape(7, 4))
    item = next(i for i in order if isinstance(i, tuple))
    batch = Collator(0)([dataset[i] for i in steps[0]])
    assert len(batch["is_replay"]) == len(rows[0]) and batch["is_replay"].sum() == len(replay[0])
    assert [r["row"] for r in dataset[item]] == list(item)


def test_mixed_rows_keep_their_own_loss_mask(tokenizer):
    sft = load_sft_examples([{"prompt": "hi", "completion": "yo"}], tokenizer, 64)
    replay = torch.arange(10, 30).reshape(2, 10)
    batch = Collator(tokenizer.pad_token_id)([MixedDataset(sft, replay)[i] for i in range(3)])
    assert batch["is_replay"].tolist() == [False, True, True]
    assert torch.equal(batch["labels"][1, :10], replay[0])  # replay trains on every token
    sft_labels = batch["labels"][0][batch["attention_mask"][0].bool()]
    assert (sft_labels == IGNORE_INDEX).sum() > 0  # SFT prompt masked
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding never trains


def test_padding_free_rows_that_fit_together_share_a_row_with_their_own_positions_and_masks(tokenizer):
    sft = load_sft_examples([{"prompt": "hi", "completion": "yo"}], tokenizer, 64)
    n = len(sft[0]["input_ids"])
    replay = torch.arange(10, 10 + 2 * (n // 2)).reshape(2, n // 2)  # two replay rows that fit beside each other
    rows = [MixedDataset(sft, replay)[i] for i in range(3)]
    collate = Collator(tokenizer.pad_token_id, attention_width=n / 4)  # attention dear enough to keep rows n wide
    batch = collate(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, n)  # 2 rows, not 3
    assert torch.equal(batch["input_ids"][0], torch.tensor(sft[0]["input_ids"]))
    m = n // 2
    assert torch.equal(batch["input_ids"][1, :2 * m], torch.cat([replay[0], replay[1]]))
    assert batch["position_ids"].tolist() == [[*range(n)], [*range(m), *range(m), *[0] * (n - 2 * m)]]
    assert batch["is_replay"].tolist() == [[False] * n, [True] * (2 * m) + [False] * (n - 2 * m)]
    assert batch["row"].tolist() == [[0] * n, [1] * m + [2] * m + [0] * (n - 2 * m)]
    # each sequence's first token is never a target (of the previous sequence's last position); padding never trains
    assert batch["labels"][1, 0].item() == batch["labels"][1, m].item() == IGNORE_INDEX
    assert torch.equal(batch["labels"][1, m + 1:2 * m], replay[1, 1:])
    assert (batch["labels"][1, 2 * m:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0], torch.tensor(sft[0]["labels"]))  # an SFT row starts on its prompt
    # when no two rows fit together the batch is the padded one
    alone = collate(rows[:2])
    assert torch.equal(alone["attention_mask"], Collator(tokenizer.pad_token_id)(rows[:2])["attention_mask"])


def test_padding_free_packs_at_the_least_estimated_compute():
    from transformers import LlamaConfig

    # SmolLM2-135M's sizes: a position's attention through a 3,072-wide packed row costs as much as its linear layers
    smollm2 = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert attention_width(smollm2) == 3072

    def cost(lengths, packs, attention=3072):
        width = max(sum(lengths[i] for i in pack) for pack in packs)
        return len(packs) * width * (1 + width / attention)

    # the shipped mix: one self-generated replay row (prompt + 48-token answer, ~85 tokens) among seven 67-token rows
    lengths = [85] + [67] * 7
    packs = packed_rows(lengths, 3072)
    assert sorted(i for pack in packs for i in pack) == list(range(8))  # every sequence once
    assert cost(lengths, packs) < 0.95 * cost(lengths, [[i] for i in range(8)])  # padded: 8 x 85 positions
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    batch = Collator(0, attention_width=3072)(rows)
    assert batch["input_ids"].shape == (len(packs), max(sum(lengths[i] for i in p) for p in packs))
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(lengths) - len(lengths)  # every target kept, once
    # rows as narrow as the lengths allow: in 4 rows the longest sequence goes beside the shortest, 85 + 62 = 147,
    # the narrowest 4 rows can be (85 shares a row with one sequence of at least 62)
    mixed = [85, 71, 70, 68, 67, 66, 65, 62]
    four = packed_rows(mixed, 1000)  # attention dear enough that 2 rows of 281 cost more
    assert len(four) == 4 and max(sum(mixed[i] for i in p) for p in four) == 147
    # attention that costs as much as the linear layers at 100 tokens: the same rows stay padded
    assert "attention_mask" in Collator(0, attention_width=100)(rows)
    assert len(packed_rows(lengths, 100)) == 8


def test_pack_replay_reads_only_what_it_needs(tokenizer):
    consumed = []

    def texts():
        for i in range(1000):
            consumed.append(i)
            yield f"document {i} about foxes and dogs."

    blocks = pack_replay(texts(), tokenizer, seq_length=16, max_sequences=5)
    assert blocks.shape == (5, 16)
    assert len(consumed) < 20
    flat = blocks.flatten().tolist()
    assert tokenizer.eos_token_id in flat  # documents are separated by EOS
    with pytest.raises(DataError, match="empty"):
        pack_replay(iter([]), tokenizer, 16, 5)


def test_stream_replay_corpus_files(tmp_path, tokenizer):
    from arr.data import stream_replay_texts

    txt = tmp_path / "corpus.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert sorted(stream_replay_texts(str(txt))) == ["first paragraph\nstill first", "second paragraph"]
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"body": "a"}, {"body": "b"}])
    assert sorted(stream_replay_texts(jsonl, text_field="body")) == ["a", "b"]
    with pytest.raises(DataError, match="c.jsonl: replay record 0 has no field 'text'"):
        list(stream_replay_texts(jsonl))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: empty replay corpus"):
        list(stream_replay_texts(str(tmp_path / "empty.txt")))


def test_wiki_replay_never_draws_a_heldout_title():
    heldout = {r["extract"] for r in resources.wiki_split("heldout")}
    replay = resources.wiki_split("replay")
    assert 800 < len(heldout) < 1200 and len(replay) > 8000
    assert not heldout & {r["extract"] for r in replay}
    assert not {r["title"] for r in resources.wiki_split("heldout")} & {r["title"] for r in replay}
    stream = resources.wiki_replay_texts(seed=0)
    drawn = [next(stream) for _ in range(2 * len(replay))]  # two full passes
    assert not heldout & set(drawn)
    assert set(drawn) == {r["extract"] for r in replay}


def test_date_task_is_deterministic_and_disjoint():
    train, test = resources.date_task("train"), resources.date_task("test")
    assert len(train) == 200 and len(test) == 100
    assert train == resources.date_task("train")
    answers = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not answers(train) & answers(test)


def test_kl_sequences_keeps_only_the_packed_sequences_with_kl_positions_in_order():
    from arr.batch import kl_sequences

    # row 0: sequence A (3 tokens), B (4 tokens, KL), one pad; row 1: C (5 tokens, KL at its first two positions), D
    # (3 tokens); row 2: E (8 tokens, no KL)
    input_ids = torch.tensor([[1, 2, 3, 10, 11, 12, 13, 0], [20, 21, 22, 23, 24, 30, 31, 32],
                              [40, 41, 42, 43, 44, 45, 46, 47]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    kl = torch.zeros(3, 7, dtype=torch.bool)
    kl[0, 3:6] = True  # B's three predictions
    kl[1, 0:2] = True
    sub, take = kl_sequences({"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}, kl)
    assert sub["input_ids"].tolist() == [[10, 11, 12, 13, 1], [20, 21, 22, 23, 24]]  # (the filler's id is unread)
    assert sub["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]] and sub["use_cache"] is False
    # the same predictions, in the same order, and what each predicts
    assert input_ids[:, :-1][kl].tolist() == sub["input_ids"][:, :-1][take(kl)].tolist() == [10, 11, 12, 20, 21]
    assert input_ids[:, 1:][kl].tolist() == sub["input_ids"][:, 1:][take(kl)].tolist() == [11, 12, 13, 21, 22]
    padded = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    sub, take = kl_sequences(padded, kl)
    assert sub["input_ids"].tolist() == input_ids[:2].tolist() and take(kl).shape == (2, 7)
    everything = torch.ones(3, 7, dtype=torch.bool)
    assert kl_sequences(padded, everything) == (padded, None)
