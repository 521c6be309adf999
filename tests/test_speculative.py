"""Speculative decoding: greedy output equals the plain generator, sampling keeps the target's distribution.

Greedy comparisons run the models in float64 (as tests/test_engine.py does): the target
verifies several tokens in one pass, which sums in another order than one token at a
time, and float64 keeps those differences near 1e-15, so no near-tie of a random model
can flip an argmax.

The distribution test (see ``test_the_rule_keeps_the_targets_distribution``) compares
the exact distribution of the first two tokens with 20,000 simulated runs of the rule.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmlab import Transformer, get_config
from llmlab.cache import KVCache
from llmlab.generate import generate_ids
from llmlab.sampling import SamplingParams, next_token_probs
from llmlab.speculative import (
    SpeculativeError,
    draft_config,
    speculative_generate,
    verify_drafts,
)
import llmlab.speculative as speculative


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a busy machine
    yield
    torch.set_num_threads(before)


def tiny(seed: int, vocab: int = 64, context: int = 24, d_model: int = 32, n_layers: int = 2,
         head_scale: float = 1.0, dtype=torch.float64) -> Transformer:
    torch.manual_seed(seed)
    cfg = get_config("course-tiny").replace(vocab_size=vocab, context_length=context, d_model=d_model,
                                            n_layers=n_layers, n_heads=2, tie_embeddings=False)
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():  # larger head weights: peaked, clearly different distributions
        model.lm_head.weight.mul_(head_scale)
    return model


def negated_copy(model: Transformer) -> Transformer:
    """A draft that proposes the target's *least* likely token: acceptance near 0."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.lm_head.weight.neg_()
    return bad


GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_equals_the_plain_generator(seed, k):
    target = tiny(seed, head_scale=20.0)
    prompt = [3, 5, 7 + seed]
    expected = list(generate_ids(target, prompt, GREEDY))  # 43 tokens > context 24: the window slides too
    drafts = {"small": tiny(100 + seed, d_model=16, n_layers=1, head_scale=20.0), "same": target,
              "bad": negated_copy(target)}
    results = {name: speculative_generate(target, draft, prompt, GREEDY, k=k) for name, draft in drafts.items()}
    for name, result in results.items():
        assert result.ids == expected, name
        assert result.accepted <= result.proposed
        assert result.draft_passes == result.proposed
    assert results["same"].acceptance_rate == 1.0
    assert results["bad"].acceptance_rate < 0.2
    # a perfect draft needs fewer target passes than tokens; a useless one about one per token
    assert results["same"].target_passes < len(expected) * 0.8 or k == 1
    assert results["same"].tokens_per_target_pass > results["bad"].tokens_per_target_pass


def test_stop_ids_and_max_new_tokens():
    target, draft = tiny(0, head_scale=20.0), tiny(1, d_model=16, n_layers=1, head_scale=20.0)
    free = speculative_generate(target, draft, [1, 2], SamplingParams(temperature=0.8, max_new_tokens=15, seed=4), k=4)
    assert len(free.ids) == 15
    stop = free.ids[6]
    first = free.ids.index(stop)
    stopped = speculative_generate(target, draft, [1, 2],
                                   SamplingParams(temperature=0.8, max_new_tokens=15, seed=4, stop_ids=(stop,)), k=4)
    assert stopped.ids == free.ids[: first + 1]
    one = speculative_generate(target, draft, [1, 2], SamplingParams(temperature=0, max_new_tokens=1), k=4)
    assert len(one.ids) == 1 and one.proposed == 0


def test_sampling_is_seeded_and_restores_training_mode():
    target, draft = tiny(0, head_scale=5.0), tiny(1, d_model=16, n_layers=1, head_scale=5.0)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=20, seed=7)
    draft.train()
    first = speculative_generate(target, draft, [4], params, k=3)
    assert draft.training and not target.training
    assert speculative_generate(target, draft, [4], params, k=3).ids == first.ids


def test_a_draft_with_a_shorter_context():
    target = tiny(0, context=24, head_scale=20.0)
    draft = tiny(1, context=8, d_model=16, n_layers=1, head_scale=20.0)
    expected = list(generate_ids(target, [1, 2, 3], GREEDY))
    result = speculative_generate(target, draft, [1, 2, 3], GREEDY, k=4)
    assert result.ids == expected


def test_bad_requests_say_what_to_do():
    target = tiny(0)
    with pytest.raises(SpeculativeError, match="vocabulary"):
        speculative_generate(target, tiny(1, vocab=65), [1], GREEDY)
    with pytest.raises(SpeculativeError, match="k must be"):
        speculative_generate(target, target, [1], GREEDY, k=0)
    with pytest.raises(SpeculativeError, match="Transformer"):
        speculative_generate(target, "draft", [1], GREEDY)
    with pytest.raises(SpeculativeError, match="draft must be"):
        speculative_generate(target, torch.nn.Linear(2, 2), [1], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(target, target, [], GREEDY)


def test_cache_truncate():
    cache = KVCache(1, 1, 1, 2, 8)
    cache.advance(5)
    cache.truncate(3)
    assert cache.length == 3
    for bad in (4, -1, 1.5):
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(bad)


def test_draft_config_shrinks_the_model():
    cfg = draft_config(get_config("course-tiny"), d_model=64, n_layers=1, n_heads=2)
    assert (cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.head_dim, cfg.d_ff) == (1024, 256, 64, 32, 256)


# --- the acceptance rule keeps the target's distribution ----------------------------------------


VOCAB = 8
SAMPLES = 20_000
# Bretagnolle–Huber–Carol: P(‖p̂ − p‖₁ ≥ ε) ≤ 2^m · exp(−n ε² / 2) for m outcomes and n samples.
# With m = 64 pairs of tokens and n = 20,000, a false failure has probability < 1e-6 when
# ε² = 2 (64 ln 2 + ln 1e6) / n, i.e. total variation ε / 2 < 0.038.
TV_LIMIT = math.sqrt(2 * (VOCAB**2 * math.log(2) + math.log(1e6)) / SAMPLES) / 2


def probability_tables(model: Transformer, prompt: list[int], params: SamplingParams):
    """The model's next-token distributions after prompt, prompt+a, prompt+a+b, for every a, b."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [64, 2]
    ids = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        probs = next_token_probs(model(ids).logits[:, -3:].float(), params)  # [64, 3, V]
    after_prompt = probs[0, 0]
    after_a = probs[::VOCAB, 1]  # row a*V + 0 holds prompt + a
    after_ab = probs[:, 2].reshape(VOCAB, VOCAB, VOCAB)
    return after_prompt, after_a, after_ab


def simulate_two_tokens(rule, p_tables, q_tables, generator, k: int = 2) -> torch.Tensor:
    """The first two tokens of SAMPLES runs of speculative decoding (k = 2, then k = 1), vectorized over runs."""
    p0, p1, p2 = p_tables
    q0, q1, _ = q_tables
    n = SAMPLES
    d1 = torch.multinomial(q0.expand(n, -1), 1, replacement=True, generator=generator)[:, 0]
    d2 = torch.multinomial(q1[d1], 1, generator=generator)[:, 0]
    q = torch.stack([q0.expand(n, -1), q1[d1]], dim=1)
    p = torch.stack([p0.expand(n, -1), p1[d1], p2[d1, d2]], dim=1)
    accepted, next_id = rule(torch.stack([d1, d2], dim=1), q, p, generator)
    first = torch.where(accepted >= 1, d1, next_id)
    # Runs whose first draft was rejected start a second round after `first`: one draft token.
    e1 = torch.multinomial(q1[first], 1, generator=generator)[:, 0]
    accepted2, next2 = rule(e1[:, None], q1[first][:, None], torch.stack([p1[first], p2[first, e1]], dim=1), generator)
    second_round = torch.where(accepted2 >= 1, e1, next2)
    second = torch.where(accepted >= 2, d2, torch.where(accepted == 1, next_id, second_round))
    return first * VOCAB + second


def total_variation(samples: torch.Tensor, exact: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=exact.numel()).double() / samples.numel()
    return 0.5 * float((empirical - exact.double()).abs().sum())


def always_accept(draft_ids, q, p, generator=None):
    """A wrong rule: keep every draft token (the output follows the draft)."""
    batch, k = draft_ids.shape
    return (torch.full((batch,), k, dtype=torch.long),
            torch.multinomial(p[:, k], 1, generator=generator)[:, 0])


def resample_from_p(draft_ids, q, p, generator=None):
    """A subtly wrong rule: the right acceptance test, but a rejected token is redrawn from p, not p − q."""
    accepted, _ = verify_drafts(draft_ids, q, p, generator)
    rows = torch.arange(len(accepted))
    return accepted, torch.multinomial(p[rows, accepted], 1, generator=generator)[:, 0]


@pytest.fixture(scope="module")
def tables():
    params = SamplingParams(temperature=1.0)
    target = tiny(3, vocab=VOCAB, context=8, d_model=16, n_layers=1, head_scale=40.0, dtype=torch.float32)
    draft = tiny(4, vocab=VOCAB, context=8, d_model=16, n_layers=1, head_scale=40.0, dtype=torch.float32)
    prompt = [1, 2]
    p_tables, q_tables = probability_tables(target, prompt, params), probability_tables(draft, prompt, params)
    exact = (p_tables[0][:, None] * p_tables[1]).flatten()  # P(a, b) = p(a | prompt) p(b | prompt, a)
    return target, draft, prompt, p_tables, q_tables, exact


def test_the_rule_keeps_the_targets_distribution(tables):
    _, _, _, p_tables, q_tables, exact = tables
    generator = torch.Generator().manual_seed(0)
    # the draft really differs from the target, so a rule that trusts it shows
    q_exact = (q_tables[0][:, None] * q_tables[1]).flatten()
    assert 0.5 * float((q_exact - exact).abs().sum()) > 4 * TV_LIMIT
    assert total_variation(simulate_two_tokens(verify_drafts, p_tables, q_tables, generator), exact) < TV_LIMIT
    for wrong in (always_accept, resample_from_p):
        assert total_variation(simulate_two_tokens(wrong, p_tables, q_tables, generator), exact) > 2 * TV_LIMIT, \
            wrong.__name__


def test_speculative_generate_samples_the_targets_first_token(tables, monkeypatch):
    # End to end (models, caches, rounds) on the first token: 400 seeded runs.  With m = 8 outcomes
    # a false failure has probability < 1e-6 below a total variation of 0.156; the draft's own
    # distribution is 0.9 away from the target's, so trusting it fails even in 100 runs.
    target, draft, prompt, p_tables, q_tables, _ = tables
    runs = 400
    limit = math.sqrt(2 * (VOCAB * math.log(2) + math.log(1e6)) / runs) / 2
    exact = p_tables[0]
    assert 0.5 * float((q_tables[0] - exact).abs().sum()) > 4 * limit

    def first_tokens(n: int) -> torch.Tensor:
        return torch.tensor([speculative_generate(target, draft, prompt, SamplingParams(max_new_tokens=2, seed=s),
                                                  k=1).ids[0] for s in range(n)])

    assert total_variation(first_tokens(runs), exact) < limit
    monkeypatch.setattr(speculative, "verify_drafts", always_accept)
    assert total_variation(first_tokens(100), exact) > limit


def test_train_draft_gives_a_small_model_with_the_targets_vocabulary(shakespeare):
    from llmlab.checkpoint import load_checkpoint
    from llmlab.speculative import train_draft

    course = load_checkpoint()
    draft = train_draft(course.model, course.tokenizer, d_model=32, n_layers=1, steps=2, batch_size=2,
                        text=shakespeare[:40_000])
    assert draft.config.vocab_size == course.config.vocab_size and not draft.training
    assert draft.num_parameters() < course.model.num_parameters() / 10
    target, draft, prompt = course.model.double(), draft.double(), course.tokenizer.encode("ROMEO:")
    assert speculative_generate(target, draft, prompt, GREEDY, k=3).ids == list(generate_ids(target, prompt, GREEDY))
