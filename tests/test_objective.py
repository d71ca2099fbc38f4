import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from arr.data import Collator, load_sft_examples
from arr.objective import ARRObjective, kl_from_logprobs, token_kl
from arr.reference import ReferenceCache, adapter_layers, adapters_off, initial_head, reference_logits
from conftest import replay_texts, sft_records

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def batch_of(tokenizer, n=4, replay_rows=0):
    rows = [{**ex, "is_replay": False} for ex in load_sft_examples(sft_records(n), tokenizer, 64)]
    for text in replay_texts(replay_rows):
        ids = tokenizer(text)["input_ids"][:16]
        rows.append({"input_ids": ids, "labels": ids, "is_replay": True})
    return Collator(tokenizer.pad_token_id)(rows)


def peft_model(model_dir, init="true", seed=0):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=True if init == "true" else init))
    for name, p in model.named_parameters():  # move B off zero so gradients reach every LoRA matrix
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_beta0_no_replay_equals_plain_lora_loss_and_gradients(model_dir, tokenizer):
    batch = batch_of(tokenizer)
    model = peft_model(model_dir)
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = ARRObjective(beta=0.0)(logits, batch["labels"], batch["attention_mask"], batch["is_replay"])
    parts.total.backward()
    assert parts.total.item() == pytest.approx(plain.item(), abs=1e-6)
    assert parts.kl.item() == 0 and parts.replay_ce.item() == 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain_grads[name], atol=1e-7, rtol=1e-5)


def naive_kl(logits, ref_logits, direction):
    """Token by token, float64, straight from the definition."""
    out = []
    for row, ref_row in zip(logits.double(), ref_logits.double()):
        p, q = torch.softmax(row, -1), torch.softmax(ref_row, -1)
        out.append((q * (q.log() - p.log())).sum() if direction == "forward" else (p * (p.log() - q.log())).sum())
    return torch.stack(out)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_and_its_gradient_match_naive_definition(direction):
    torch.manual_seed(0)
    logits = torch.randn(7, 50, requires_grad=True)
    ref = torch.randn(7, 50)
    ours = token_kl(logits, ref, direction)
    naive = naive_kl(logits, ref, direction)
    torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_naive,) = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(g_ours, g_naive, atol=1e-6, rtol=1e-5)
    if direction == "forward":  # d KL(q||p) / d logits = p - q
        torch.testing.assert_close(g_ours, torch.softmax(logits, -1) - torch.softmax(ref, -1), atol=1e-6, rtol=1e-5)


def test_reference_is_initial_model_and_kl_zero_then_positive(model_dir, tokenizer):
    batch = batch_of(tokenizer, replay_rows=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    untouched = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        expected = untouched(**inputs).logits
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA))
    objective = ARRObjective(beta=1.0, kl_on="all")

    ref = reference_logits(model, adapter_layers(model), inputs)
    torch.testing.assert_close(ref, expected, atol=0, rtol=0)
    parts = objective(model(**inputs).logits, batch["labels"], batch["attention_mask"], batch["is_replay"], ref)
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-7)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B = 0 at init, so step one moves only B; step two moves the logits
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        parts = objective(model(**inputs).logits, batch["labels"], batch["attention_mask"], batch["is_replay"],
                          reference_logits(model, adapter_layers(model), inputs))
    assert parts.kl.item() > 1e-4
    # the reference is still the untouched model after training
    torch.testing.assert_close(reference_logits(model, adapter_layers(model), inputs), expected, atol=0, rtol=0)


def test_kl_on_selects_positions(tokenizer):
    batch = batch_of(tokenizer, n=2, replay_rows=2)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 20)
    ref = torch.randn_like(logits)
    mask = batch["attention_mask"][:, 1:].bool()
    rows = batch["is_replay"][:, None]
    per_token = token_kl(logits[:, :-1], ref[:, :-1], "forward")
    for kl_on, selected in [("sft", mask & ~rows), ("replay", mask & rows), ("all", mask)]:
        labels = torch.zeros_like(batch["labels"])
        parts = ARRObjective(beta=1.0, kl_on=kl_on)(logits, labels, batch["attention_mask"], batch["is_replay"], ref)
        assert parts.kl.item() == pytest.approx(per_token[selected].mean().item(), rel=1e-5)


def test_replay_ce_is_mean_over_every_replay_token(tokenizer):
    batch = batch_of(tokenizer, n=2, replay_rows=2)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    parts = ARRObjective(beta=0.0, replay_weight=0.5)(logits, batch["labels"], batch["attention_mask"],
                                                      batch["is_replay"])
    replay = batch["is_replay"]
    ce = torch.nn.functional.cross_entropy(logits[replay, :-1].reshape(-1, logits.shape[-1]),
                                           batch["labels"][replay, 1:].reshape(-1), reduction="none")
    n_real = batch["attention_mask"][replay, 1:].sum()
    assert parts.replay_ce.item() == pytest.approx((ce.sum() / n_real).item(), rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.sft_ce.item() + 0.5 * parts.replay_ce.item(), rel=1e-6)


def cached_reference(ref_logits, topk):
    """`ref_cached` for a batch whose row i is cache row i: its reference log-probs, all or the top k (as built by
    ReferenceCache.build)."""
    logp = torch.log_softmax(ref_logits[:, :-1].float(), -1)
    rows, width = logp.shape[:2]
    logp = logp.reshape(rows * width, -1)
    offsets = torch.arange(rows) * width
    if topk is None:
        cache = ReferenceCache(logp, offsets)
    else:
        values, idx = logp.topk(topk, -1)
        cache = ReferenceCache(values, offsets, idx.int(), logp.scatter(1, idx, float("-inf")).logsumexp(-1))
    return cache.positions(torch.arange(rows), width + 1), lambda entries: cache.lookup(entries, "cpu")


@pytest.mark.parametrize("kl_on, direction, cache", [("all", "forward", None), ("sft", "reverse", None),
                                                     ("replay", "forward", None), ("all", "forward", 5),
                                                     ("all", "reverse", 5), ("sft", "forward", "exact")])
def test_chunked_loss_from_hidden_states_is_gradient_exact(llama_dir, tokenizer, kl_on, direction, cache):
    """The chunked loss, which computes each part's gradient on the logits in closed form, against autograd through
    the full-logits loss: on-line reference, or a cached one (exact or top k)."""
    batch = batch_of(tokenizer, n=3, replay_rows=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(**{**LORA, "target_modules": ["q_proj", "v_proj", "lm_head"]}))
    objective = ARRObjective(beta=0.7, kl_on=kl_on, kl_direction=direction, replay_weight=0.5)
    for name, p in model.named_parameters():  # move the adapter so KL and all gradients are non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    args = (batch["labels"], batch["attention_mask"], batch["is_replay"])

    ref_logits = reference_logits(model, adapter_layers(model), inputs)
    ref_cached = None if cache is None else cached_reference(ref_logits, None if cache == "exact" else cache)
    naive = objective(model(**inputs).logits, *args, None if cache else ref_logits, ref_cached=ref_cached)
    naive.total.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    decoder = model.get_decoder()
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = decoder(**inputs).last_hidden_state
    hidden = decoder(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    chunked = objective.forward_hidden(hidden, head, *args, ref_hidden, initial_head(head), chunk_size=7,
                                       ref_cached=ref_cached)
    chunked.total.backward()
    for a, b in zip(chunked, naive):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
    assert naive.kl.item() > 1e-4
    lm_head_grads = [n for n in expected if "lm_head" in n and "lora" in n]
    assert lm_head_grads and all(expected[n].abs().sum() > 0 for n in lm_head_grads)  # LoRA on lm_head trains
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # no gradient taken: the same values
        values = objective.forward_hidden(hidden, head, *args, ref_hidden, initial_head(head), chunk_size=7,
                                          ref_cached=ref_cached)
    assert [v.item() for v in values] == pytest.approx([v.item() for v in chunked], rel=1e-6)


class RecordingHead(torch.nn.Module):
    """A linear head that notes, at every call, how many of the logits tensors it returned before are still alive."""

    def __init__(self, hidden_size, vocab):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, vocab, bias=False)
        self.outputs, self.alive_at_call = [], []

    def forward(self, h):
        self.alive_at_call.append(sum(ref() is not None for ref in self.outputs))
        logits = self.linear(h)
        self.outputs.append(weakref.ref(logits))
        return logits


@pytest.mark.parametrize("grad", [True, False])
def test_chunked_loss_frees_each_chunks_logits_before_the_next_chunk(grad):
    """At most one chunk's logits (the trained model's, while the reference's are made) exist at a time: a chunk's
    [n, V] tensors kept alive into the next chunk would raise the loss's peak memory by a chunk."""
    torch.manual_seed(0)
    head = RecordingHead(16, 50)
    hidden = torch.randn(2, 20, 16, requires_grad=grad)
    labels = torch.randint(0, 50, (2, 20))
    mask, is_replay = torch.ones(2, 20, dtype=torch.long), torch.tensor([False, True])
    with torch.set_grad_enabled(grad):
        parts = ARRObjective(beta=0.5).forward_hidden(hidden, head, labels, mask, is_replay, torch.randn(2, 20, 16),
                                                      head, chunk_size=8)
    assert len(head.alive_at_call) == 2 * 5  # 38 positions in 5 chunks, trained and reference head each
    assert max(head.alive_at_call) == 1 and head.alive_at_call[::2] == [0] * 5
    assert parts.kl.item() > 0


@pytest.mark.parametrize("lora, head_trained", [
    ({"target_modules": ["q_proj", "lm_head"]}, True),  # a LoRA on the head
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, True),  # a trained copy of the head
    ({"target_modules": ["q_proj"]}, False),
])
def test_initial_head_is_the_head_with_the_adapter_off(llama_dir, lora, head_trained):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(**{**LORA, **lora}))
    hidden = torch.randn(5, model.config.hidden_size)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # move every trainable weight away from its init
                p.add_(0.05 * torch.randn_like(p))
        with model.disable_adapter():
            expected = head(hidden)
        trained, initial = head(hidden), initial_head(head)(hidden)
    torch.testing.assert_close(initial, expected, atol=0, rtol=0)
    assert ((trained - expected).abs().max() > 1e-3) == head_trained


@pytest.mark.parametrize("lora", [{"target_modules": ["q_proj", "lm_head"]}, {"target_modules": ["q_proj", "v_proj"],
                                   "modules_to_save": ["lm_head"]}])
def test_adapters_off_is_disable_adapter_and_restores_each_layer(model_dir, tokenizer, lora):
    batch = batch_of(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**{**LORA, **lora}))
    layers = adapter_layers(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = model(**inputs).logits
        with model.disable_adapter():
            expected = model(**inputs).logits
        layers[0].enable_adapters(False)  # a layer already off stays off afterwards
        with adapters_off(layers):
            initial = model(**inputs).logits
    torch.testing.assert_close(initial, expected, atol=0, rtol=0)
    assert (trained - expected).abs().max() > 1e-3
    assert [layer.disable_adapters for layer in layers] == [True] + [False] * (len(layers) - 1)


def test_topk_reference_kl_is_the_coarsened_kl_a_lower_bound_and_exact_at_full_k():
    from arr.objective import kl_to_reference

    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 50), -1)
    ref = torch.log_softmax(3 * torch.randn(5, 50), -1)
    for direction in ("forward", "reverse"):
        exact = kl_to_reference(logp, ref, direction=direction)
        torch.testing.assert_close(exact, kl_from_logprobs(logp, ref, direction))
        full_k = ref.topk(50, -1)
        torch.testing.assert_close(kl_to_reference(logp, full_k.values, full_k.indices,
                                                   torch.full((5,), float("-inf")), direction), exact)
        values, ids = ref.topk(4, -1)
        tail = ref.scatter(1, ids, float("-inf")).logsumexp(-1)
        approx = kl_to_reference(logp, values, ids, tail, direction)
        # by hand: the two distributions over {4 tokens, everything else}
        p = torch.cat([values, tail[:, None]], 1).exp()
        q = torch.cat([logp.gather(1, ids), logp.scatter(1, ids, float("-inf")).logsumexp(-1)[:, None]], 1).exp()
        a, b = (p, q) if direction == "forward" else (q, p)
        torch.testing.assert_close(approx, (a * (a.log() - b.log())).sum(-1))
        assert (approx <= exact + 1e-6).all() and (approx < exact).any()
