import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from arr.cache import ReferenceCache
from arr.chunked_loss import RefLogprobs, kl_from_logprobs, kl_to_reference
from arr.data import Collator, load_sft_examples
from arr.objective import ARRObjective
from arr.initial import InitialModel, initial_head
from arr.reference import CachedReference, OnlineReference, reference_logits
from conftest import replay_texts, sft_records


def token_kl(logits, ref_logits, direction):
    """KL per row of [N, V] logits, through the library's log-prob form."""
    return kl_to_reference(torch.log_softmax(logits.float(), -1),
                           RefLogprobs(torch.log_softmax(ref_logits.float(), -1)), direction)

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
    parts = ARRObjective(beta=0.0)(logits, batch)
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
    initial = InitialModel(model)
    objective = ARRObjective(beta=1.0, kl_on="all")

    ref = reference_logits(model, initial, inputs)
    torch.testing.assert_close(ref, expected, atol=0, rtol=0)
    parts = objective(model(**inputs).logits, batch, OnlineReference(ref))
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-7)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B = 0 at init, so step one moves only B; step two moves the logits
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        parts = objective(model(**inputs).logits, batch,
                          OnlineReference(reference_logits(model, initial, inputs)))
    assert parts.kl.item() > 1e-4
    # the reference is still the untouched model after training
    torch.testing.assert_close(reference_logits(model, initial, inputs), expected, atol=0, rtol=0)


def test_kl_on_selects_positions(tokenizer):
    batch = batch_of(tokenizer, n=2, replay_rows=2)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    ref = torch.randn_like(logits)
    mask = batch["attention_mask"][:, 1:].bool()
    rows = batch["is_replay"][:, None]
    per_token = token_kl(logits[:, :-1], ref[:, :-1], "forward")
    response = batch["labels"][:, 1:].ne(-100) & ~rows
    for kl_on, selected in [("sft", mask & ~rows), ("replay", mask & rows), ("all", mask),
                            ("prompt_and_replay", mask & ~response)]:
        objective = ARRObjective(beta=1.0, kl_on=kl_on)
        parts = objective(logits, batch, OnlineReference(ref))
        assert parts.kl.item() == pytest.approx(per_token[selected].mean().item(), rel=1e-5)
        # kl_rows (what a reference cache covers) names exactly the kinds of row that hold these positions
        holding = objective.positions(batch).kl.any(1)
        assert set(objective.kl_rows()) == {kind for kind, of_kind in (("sft", ~rows[:, 0]), ("replay", rows[:, 0]))
                                            if holding[of_kind].any()}
    assert (mask & rows).sum() < (mask & ~response).sum() < mask.sum()  # the placements differ here


def test_replay_ce_is_mean_over_every_replay_token(tokenizer):
    batch = batch_of(tokenizer, n=2, replay_rows=2)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    parts = ARRObjective(beta=0.0, replay_weight=0.5)(logits, batch)
    replay = batch["is_replay"]
    ce = torch.nn.functional.cross_entropy(logits[replay, :-1].reshape(-1, logits.shape[-1]),
                                           batch["labels"][replay, 1:].reshape(-1), reduction="none")
    n_real = batch["attention_mask"][replay, 1:].sum()
    assert parts.replay_ce.item() == pytest.approx((ce.sum() / n_real).item(), rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.sft_ce.item() + 0.5 * parts.replay_ce.item(), rel=1e-6)


def cached_reference(ref_logits, topk):
    """A CachedReference for a padded batch whose row i is cache row i: its reference log-probs, all or the top k
    (as ReferenceCache.build makes them)."""
    logp = torch.log_softmax(ref_logits[:, :-1].float(), -1)
    rows, width = logp.shape[:2]
    logp = logp.reshape(rows * width, -1)
    offsets = torch.arange(rows) * width
    if topk is None:
        cache = ReferenceCache(logp, offsets)
    else:
        values, idx = logp.topk(topk, -1)
        following = ref_logits.new_zeros(rows, width, dtype=torch.long)  # the next token of each position
        following[:] = ROW_TOKENS[0][:, 1:]
        cache = ReferenceCache(values, offsets, idx.int(), logp.scatter(1, idx, float("-inf")).logsumexp(-1),
                               logp.gather(1, following.reshape(-1, 1)).squeeze(1))
    return CachedReference(cache, cache.positions(torch.arange(rows), width + 1), "cpu")


ROW_TOKENS = []  # the batch's input_ids, for cached_reference's label log-probs


def safe_kl(logp, ref_logp, direction):
    """KL from log-probs where some outcomes have probability 0 (log -inf): they add 0, with finite gradients."""
    gone = torch.isinf(logp) | torch.isinf(ref_logp)
    logp, ref_logp = logp.masked_fill(gone, 0.0), ref_logp.masked_fill(gone, 0.0)
    p, q = logp.exp().masked_fill(gone, 0.0), ref_logp.exp().masked_fill(gone, 0.0)
    return (q * (ref_logp - logp)).sum(-1) if direction == "forward" else (p * (logp - ref_logp)).sum(-1)


def autograd_loss(objective, logits, batch, ref_logits, topk=None):
    """The ARR loss straight from the definitions in objective.py, differentiated by autograd: CE by
    F.cross_entropy; the KL on full-vocabulary log-probs, with the label removed (-inf) and renormalised at
    kl_masked positions; for a top-k reference both distributions summed into the k tokens and "any other"."""
    pos = objective.positions(batch)
    targets = batch["labels"][:, 1:].clamp(min=0)
    logits = logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    sft_ce = ce[pos.sft].sum() / pos.sft.sum().clamp(min=1)
    replay_ce = ce[pos.replay].sum() / pos.replay.sum().clamp(min=1)
    z, r, y = logits[pos.kl], ref_logits[:, :-1].float()[pos.kl], targets[pos.kl]
    drop = torch.nn.functional.one_hot(y, z.shape[-1]).bool() & pos.kl_masked[pos.kl][:, None]
    logp = torch.log_softmax(z.masked_fill(drop, float("-inf")), -1)
    ref = torch.log_softmax(r.masked_fill(drop, float("-inf")), -1)
    if topk is not None:  # outcomes: the unmasked reference's top k, then everything else
        idx = torch.log_softmax(r, -1).topk(topk, -1).indices
        rest = torch.ones_like(logp, dtype=torch.bool).scatter(1, idx, False)
        logp = torch.cat([logp.gather(1, idx), logp.masked_fill(~rest, float("-inf")).logsumexp(-1, keepdim=True)], 1)
        ref = torch.cat([ref.gather(1, idx), ref.masked_fill(~rest, float("-inf")).logsumexp(-1, keepdim=True)], 1)
    per_position = safe_kl(logp, ref, objective.kl_direction)
    task_rows = ~batch["is_replay"].bool()[:, None].expand_as(pos.kl)  # task_kl_beta: their KL is a term of its own
    on_task = task_rows[pos.kl] & (objective.task_kl_beta is not None)
    kl = per_position[~on_task].sum() / (~on_task).sum().clamp(min=1)
    kl_task = per_position[on_task].sum() / on_task.sum().clamp(min=1)
    total = (sft_ce + objective.beta * kl + (objective.task_kl_beta or 0) * kl_task
             + objective.replay_weight * replay_ce)
    return total, (sft_ce, kl, kl_task, replay_ce)


@pytest.mark.parametrize("kl_on, direction, mask, cache, task_beta", [
    ("all", "forward", False, None, None), ("sft", "reverse", False, None, None),
    ("replay", "forward", False, None, None), ("prompt_and_replay", "forward", False, None, None),
    ("all", "forward", True, None, None), ("all", "reverse", True, None, None), ("all", "forward", False, 5, None),
    ("all", "reverse", False, 5, None), ("all", "forward", True, 5, None), ("all", "reverse", True, 5, None),
    ("sft", "forward", False, "exact", None), ("all", "forward", True, "exact", None),
    ("all", "forward", True, 5, 0.1), ("prompt_and_replay", "reverse", False, None, 2.0)])
def test_loss_is_gradient_exact_against_autograd(llama_dir, tokenizer, kl_on, direction, mask, cache, task_beta):
    """The chunked loss from hidden states (closed-form gradients, LoRA on the head) and the full-logits path,
    against autograd through the definitions: on-line reference, or a cached one (exact or top k), with and without
    the target masked, with one KL or the task rows' KL at a weight of its own (task_kl_beta)."""
    batch = batch_of(tokenizer, n=3, replay_rows=2)
    ROW_TOKENS[:] = [batch["input_ids"]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(**{**LORA, "target_modules": ["q_proj", "v_proj", "lm_head"]}))
    initial = InitialModel(model)  # at the init: π₀ is the adapter switched off
    objective = ARRObjective(beta=0.7, kl_on=kl_on, kl_direction=direction, kl_mask_target=mask, replay_weight=0.5,
                             task_kl_beta=task_beta)
    for name, p in model.named_parameters():  # move the adapter so KL and all gradients are non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads():
        out = {n: p.grad.clone() for n, p in trained}
        model.zero_grad()
        return out

    ref_logits = reference_logits(model, initial, inputs)
    total, expected_parts = autograd_loss(objective, model(**inputs).logits, batch, ref_logits,
                                          None if cache in (None, "exact") else cache)
    total.backward()
    expected = grads()
    assert expected_parts[1].item() > 1e-4
    assert expected_parts[2].item() > 1e-4 if task_beta else expected_parts[2].item() == 0
    assert objective.positions(batch).kl_masked.any() == mask

    def reference(hidden_form):
        if cache is not None:
            return cached_reference(ref_logits, None if cache == "exact" else cache)
        if not hidden_form:
            return OnlineReference(ref_logits)
        with torch.no_grad(), model.disable_adapter():
            return OnlineReference(model.get_decoder()(**inputs).last_hidden_state,
                                   initial_head(model.get_output_embeddings()))

    head = model.get_output_embeddings()
    for form in ("hidden", "logits"):
        if form == "hidden":
            parts = objective(model.get_decoder()(**inputs).last_hidden_state, batch, reference(True), head,
                              chunk_size=7)
        else:
            parts = objective(model(**inputs).logits, batch, reference(False))
        parts.total.backward()
        assert parts.total.item() == pytest.approx(total.item(), rel=1e-5)
        assert [parts.sft_ce.item(), parts.kl.item(), parts.kl_task.item(), parts.replay_ce.item()] == pytest.approx(
            [v.item() for v in expected_parts], rel=1e-5, abs=1e-7)
        got = grads()
        lm_head_grads = [n for n in expected if "lm_head" in n and "lora" in n]
        assert lm_head_grads and all(expected[n].abs().sum() > 0 for n in lm_head_grads)  # LoRA on lm_head trains
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # no gradient taken: the same values
        values = objective(model.get_decoder()(**inputs).last_hidden_state, batch, reference(True), head,
                           chunk_size=7)
    assert values.total.item() == pytest.approx(total.item(), rel=1e-5)


def test_masked_kl_matches_a_hand_computed_value():
    """Mask-the-Target on a 4-token vocabulary, label 0: both distributions without token 0, renormalised."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1, 1e-9]]))[:, :4]
    ref = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]]))
    batch = {"input_ids": torch.tensor([[5, 0]]), "labels": torch.tensor([[-100, 0]]),
             "attention_mask": torch.ones(1, 2, dtype=torch.long), "is_replay": torch.tensor([False])}
    p, q = torch.tensor([0.5, 1 / 3, 1 / 6]), torch.tensor([2 / 3, 2 / 9, 1 / 9])  # tokens 1-3, renormalised
    for direction, expected in (("forward", (q * (q / p).log()).sum()), ("reverse", (p * (p / q).log()).sum())):
        objective = ARRObjective(beta=1.0, kl_direction=direction, kl_mask_target=True)
        parts = objective(torch.cat([logits, logits])[None], batch, OnlineReference(torch.cat([ref, ref])[None]))
        assert parts.kl.item() == pytest.approx(expected.item(), rel=1e-5)
        unmasked = ARRObjective(beta=1.0, kl_direction=direction)(
            torch.cat([logits, logits])[None], batch, OnlineReference(torch.cat([ref, ref])[None]))
        assert abs(unmasked.kl.item() - parts.kl.item()) > 0.05  # the label's own mass no longer counts


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
    batch = {"labels": labels, "attention_mask": mask, "is_replay": is_replay}
    with torch.set_grad_enabled(grad):
        parts = ARRObjective(beta=0.5)(hidden, batch, OnlineReference(torch.randn(2, 20, 16), head), head, chunk_size=8)
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
def test_fast_switch_is_disable_adapter_and_restores_each_layer(model_dir, tokenizer, lora):
    batch = batch_of(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**{**LORA, **lora}))
    initial = InitialModel(model)  # set up at the init (a no-op adapter: π₀ is the adapter switched off)
    layers = initial.layers
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = model(**inputs).logits
        with model.disable_adapter():
            expected = model(**inputs).logits
        layers[0].enable_adapters(False)  # a layer already off stays off afterwards
        with initial.switched_to():
            switched = model(**inputs).logits
    torch.testing.assert_close(switched, expected, atol=0, rtol=0)
    assert (trained - expected).abs().max() > 1e-3
    assert [layer.disable_adapters for layer in layers] == [True] + [False] * (len(layers) - 1)


def test_topk_reference_kl_is_the_coarsened_kl_a_lower_bound_and_exact_at_full_k():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 50), -1)
    ref = torch.log_softmax(3 * torch.randn(5, 50), -1)
    for direction in ("forward", "reverse"):
        exact = kl_to_reference(logp, RefLogprobs(ref), direction=direction)
        torch.testing.assert_close(exact, kl_from_logprobs(logp, ref, direction))
        full_k = ref.topk(50, -1)
        torch.testing.assert_close(kl_to_reference(logp, RefLogprobs(full_k.values, full_k.indices,
                                                               torch.full((5,), float("-inf"))), direction), exact)
        values, ids = ref.topk(4, -1)
        tail = ref.scatter(1, ids, float("-inf")).logsumexp(-1)
        approx = kl_to_reference(logp, RefLogprobs(values, ids, tail), direction)
        # by hand: the two distributions over {4 tokens, everything else}
        p = torch.cat([values, tail[:, None]], 1).exp()
        q = torch.cat([logp.gather(1, ids), logp.scatter(1, ids, float("-inf")).logsumexp(-1)[:, None]], 1).exp()
        a, b = (p, q) if direction == "forward" else (q, p)
        torch.testing.assert_close(approx, (a * (a.log() - b.log())).sum(-1))
        assert (approx <= exact + 1e-6).all() and (approx < exact).any()


def test_kl_positions_take_chunks_of_their_own_in_order(monkeypatch):
    """Chunks never mix KL with CE-only positions (a mixed chunk copies its KL rows out: one [chunk, V] tensor
    more), the reference is read in order, and the sums and gradients are those of one chunk of everything."""
    import arr.chunked_loss as cl

    torch.manual_seed(0)
    n, hidden_size, vocab = 23, 8, 11
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    inputs = torch.randn(n, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    kl = torch.tensor([i % 3 != 0 for i in range(n)])  # interleaved with CE-only positions
    sft = ~kl | (torch.arange(n) % 2 == 0)
    ref_logp = torch.log_softmax(torch.randn(int(kl.sum()), vocab), -1)
    asked, chunks = [], []

    def reference(a, b):
        asked.append((a, b))
        return RefLogprobs(ref_logp[a:b].clone())

    real = cl._chunk_sums_and_logit_grad
    monkeypatch.setattr(cl, "_chunk_sums_and_logit_grad", lambda *args: chunks.append(args[4].clone()) or real(*args))
    weights = torch.tensor([1.0, 0.5, 0.0, 0.0])
    none = torch.zeros(n, dtype=torch.bool)
    results = []
    for chunk_size in (4, 0):
        inputs.grad = None
        sums, term = cl.chunked_token_loss(inputs, head, targets, sft, none, kl, none, none, weights, reference,
                                           "forward", chunk_size)
        term.backward()
        results.append((sums, inputs.grad.clone()))
        if chunk_size:
            assert all(c.all() or not c.any() for c in chunks) and len(chunks) == 2 + 4  # 8 CE-only, 15 KL
            assert [a for a, _ in asked] == [0, 4, 8, 12] and asked[-1][1] == int(kl.sum())
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_the_full_logits_path_takes_bf16_logits():
    """FSDP/DeepSpeed and loss_chunk_size 0 pass the model's logits, bf16 under mixed precision: the loss is the
    float32 logits' and their gradient comes back in bf16."""
    import arr.chunked_loss as cl

    torch.manual_seed(0)
    n, vocab = 9, 13
    logits = torch.randn(n, vocab)
    targets = torch.randint(0, vocab, (n,))
    kl = torch.arange(n) % 2 == 0
    ref = RefLogprobs(torch.log_softmax(torch.randn(int(kl.sum()), vocab), -1))
    none = torch.zeros(n, dtype=torch.bool)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = logits.to(dtype).detach().requires_grad_()
        sums, term = cl.chunked_token_loss(inputs, None, targets, ~kl, none, kl, none, none,
                                           torch.tensor([1.0, 0.5, 0.0, 0.0]),
                                           lambda a, b: RefLogprobs(ref.logp[a:b].clone()), "forward", 0)
        term.backward()
        assert inputs.grad.dtype == dtype
        results.append((sums, inputs.grad.float()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=5e-2, atol=1e-2)
