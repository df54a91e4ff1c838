"""Searchers: valid proposals, real learning, exact state round trips."""

from __future__ import annotations

import io

import pytest
import torch

from nos.config import ConfigError, SearchConfig
from nos.resume import CheckpointUnreadable, restore_searcher
from nos.rules import from_tokens
from nos.rules.vocabulary import TOKENS, position_kinds, sequence_length
from nos.search import SEARCHERS, make_searcher, state_from_bytes, state_to_bytes
from nos.store.models import Checkpoint
from nos.tensor_state import MAGIC, PickledState, TensorStateError

from helpers.search import run, same_state, target_reward


@pytest.mark.parametrize("name", sorted(SEARCHERS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_proposals_are_valid_sequences(name, depth):
    proposals = make_searcher(name, depth=depth, seed=1).propose(16)
    assert len(proposals) == 16
    for p in proposals:
        assert len(p.tokens) == sequence_length(depth)
        assert [TOKENS[t].kind for t in p.tokens] == list(position_kinds(depth))
        assert from_tokens(p.tokens, depth) == p.tree


@pytest.mark.parametrize(("depth", "margin"), [(1, 0.35), (2, 0.12)])
def test_ppo_learns_what_random_search_cannot(depth, margin):
    reward = target_reward(depth)
    random_mean = sum(run(make_searcher("random", depth=depth, seed=0), reward, 20)[-100:]) / 100
    ppo_rewards = run(make_searcher("ppo", depth=depth, seed=0), reward, 20)
    ppo_first, ppo_last = sum(ppo_rewards[:100]) / 100, sum(ppo_rewards[-100:]) / 100
    assert ppo_last > random_mean + margin, (ppo_last, random_mean)
    assert ppo_last > ppo_first + margin


def test_reinforce_learns_too():
    reward = target_reward(1)
    rewards = run(make_searcher("reinforce", depth=1, seed=0), reward, 20)
    assert sum(rewards[-100:]) / 100 > sum(rewards[:100]) / 100 + 0.05


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_restored_state_continues_identically(name):
    reward = target_reward(2)
    straight = make_searcher(name, depth=2, seed=4)
    run(straight, reward, 3)
    saved = state_to_bytes(straight.state_dict())
    after = run(straight, reward, 3)

    restored = make_searcher(name, depth=2, seed=99)
    restored.load_state_dict(state_from_bytes(saved))
    assert run(restored, reward, 3) == after
    assert same_state(restored.state_dict(), straight.state_dict())


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_a_checkpoint_is_json_and_raw_tensors_not_a_pickle(name, monkeypatch):
    searcher = make_searcher(name, depth=2, seed=4)
    run(searcher, target_reward(2), 2)
    saved = state_to_bytes(searcher.state_dict())
    assert saved.startswith(MAGIC)

    def never(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr("pickle.loads", never)
    monkeypatch.setattr("pickle.Unpickler", never)
    assert same_state(state_from_bytes(saved), searcher.state_dict())


def _checkpoint(blob: bytes) -> Checkpoint:
    return Checkpoint(run_id=7, step=3, state={"tokens": [[1, 2]]}, rng_state={}, blob=blob)


def test_a_checkpoint_of_an_earlier_nos_is_refused_unread_with_what_to_do():
    searcher = make_searcher("ppo", depth=2, seed=4)
    buffer = io.BytesIO()
    torch.save(searcher.state_dict(), buffer)   # how nos stored a searcher's state before
    with pytest.raises(PickledState):
        state_from_bytes(buffer.getvalue())
    with pytest.raises(CheckpointUnreadable) as refused:
        restore_searcher(searcher, _checkpoint(buffer.getvalue()), synchronous=True)
    message = str(refused.value)
    assert message.startswith("run 7: its checkpoint of step 3 cannot be read: it was written by an earlier nos")
    assert "unpickles nothing" in message and "the run cannot resume from it" in message
    assert "start a new run" in message


@pytest.mark.parametrize("blob", [MAGIC + b"\x00damaged", b"\x00damaged", state_to_bytes([1, 2])])
def test_a_damaged_checkpoint_is_one_clear_error(blob):
    if not blob.startswith(b"\x00"):
        with pytest.raises(TensorStateError):
            state_from_bytes(blob)
    with pytest.raises(CheckpointUnreadable, match="run 7: its checkpoint of step 3 cannot be read "
                                                   r"\(TensorStateError: .*\); the run cannot resume from it"):
        restore_searcher(make_searcher("ppo", depth=2, seed=4), _checkpoint(blob), synchronous=True)


def test_observe_learns_the_same_from_rebuilt_tokens():
    # After a crash the driver hands observe() tokens read back from the database.
    reward = target_reward(2)
    a, b = make_searcher("ppo", depth=2, seed=7), make_searcher("ppo", depth=2, seed=7)
    pa, pb = a.propose(10), b.propose(10)
    assert [p.tokens for p in pa] == [p.tokens for p in pb]
    a.observe([p.tokens for p in pa], [reward(p.tokens) for p in pa])
    b.observe([list(p.tokens) for p in pb], [reward(p.tokens) for p in pb])
    for x, y in zip(a.controller.parameters(), b.controller.parameters()):
        assert torch.equal(x, y)


def test_bad_searcher_arguments():
    with pytest.raises(ValueError, match="unknown searcher"):
        make_searcher("annealing")
    with pytest.raises(ValueError, match="depth"):
        make_searcher("ppo", depth=4)
    with pytest.raises(TypeError):
        make_searcher("ppo", learning_rate=1.0)
    ppo = make_searcher("ppo", depth=2, seed=0)
    with pytest.raises(ValueError, match="searcher"):
        ppo.load_state_dict(make_searcher("random", depth=2).state_dict())
    with pytest.raises(ValueError, match="settings this nos does not know"):
        ppo.load_state_dict({**ppo.state_dict(), "config": {**ppo.state_dict()["config"], "momentum": 0.9}})
    with pytest.raises(ValueError, match="lr must be a positive number"):
        make_searcher("ppo", lr=-1.0)
    with pytest.raises(ValueError, match="baseline must be one of"):
        make_searcher("ppo", baseline="median")
    with pytest.raises(ValueError, match="hidden must be a whole number"):
        make_searcher("ppo", hidden=-1)


def test_a_checkpoint_resumes_with_the_settings_it_was_made_with():
    # A run started under other controller settings (an older nos's defaults) keeps them on resume.
    reward = target_reward(2)
    original = make_searcher("ppo", depth=2, seed=4, lr=0.1, hidden=16)
    run(original, reward, 2)
    saved = state_to_bytes(original.state_dict())
    after = run(original, reward, 2)
    restored = make_searcher("ppo", depth=2, seed=4)
    restored.load_state_dict(state_from_bytes(saved))
    assert restored.config.lr == 0.1
    assert restored.config.hidden == 16
    assert run(restored, reward, 2) == after


def test_a_batch_of_equal_rewards_moves_the_policy_by_the_entropy_bonus_alone():
    # All rejected, say: nothing says which rules are better, so the policy term is 0; the bonus still applies.
    still = make_searcher("ppo", depth=2, seed=0, entropy_weight=0.0)
    proposals = still.propose(20)
    before = [p.detach().clone() for p in still.controller.parameters()]
    still.observe([p.tokens for p in proposals], [0.0] * 20)
    assert all(torch.equal(a, b) for a, b in zip(before, still.controller.parameters()))

    spread = make_searcher("ppo", depth=2, seed=0)
    proposals = spread.propose(20)
    seqs = torch.tensor([p.tokens for p in proposals])
    entropy = spread.controller.log_prob_and_entropy(seqs)[1].mean().item()
    spread.observe([p.tokens for p in proposals], [0.0] * 20)
    assert spread.controller.log_prob_and_entropy(seqs)[1].mean().item() > entropy


def test_a_policy_collapsed_onto_one_rule_explores_its_way_out():
    """Its batches are that rule five times, tied: the whole update, entropy bonus included, was skipped, and
    the search proposed the worse rule 99.6% of the time after 500 more samples."""
    from nos.rules import parse, to_tokens

    searcher = make_searcher("ppo", depth=2, seed=0)
    target = torch.tensor([to_tokens(parse("sign(m) * g"), 2)])
    sharpen = torch.optim.Adam(searcher.controller.parameters(), lr=3e-2)
    for _ in range(60):   # as PPO leaves a policy once it has converged
        sharpen.zero_grad()
        (-searcher.controller.log_prob_and_entropy(target)[0].mean()).backward()
        sharpen.step()
    assert searcher.controller.log_prob_and_entropy(target)[0].exp().item() > 0.99
    others = 0
    for _ in range(20):
        proposals = searcher.propose(5)
        rewards = [0.5 if p.text == "sign(m) * g" else 1.0 for p in proposals]   # every other rule is better
        others += sum(r == 1.0 for r in rewards)
        searcher.observe([p.tokens for p in proposals], rewards)
    assert others > 0
    assert searcher.controller.log_prob_and_entropy(target)[0].exp().item() < 0.5


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_with_the_ema_baseline_a_one_result_update_teaches(name):
    """A result above the running mean makes its rule likelier; one at a time, as update_every = 1 sends them."""
    searcher = make_searcher(name, depth=2, seed=0, baseline="ema")
    first = searcher.propose(8)
    searcher.observe([p.tokens for p in first], [0.1] * 8)   # sets the EMA
    (good,) = searcher.propose(1)
    before = searcher.controller.log_prob_and_entropy(torch.tensor([good.tokens]))[0].item()
    searcher.observe([good.tokens], [0.9])
    assert searcher.controller.log_prob_and_entropy(torch.tensor([good.tokens]))[0].item() > before


def test_update_every_1_with_the_batch_baseline_is_refused():
    """Each one-result update would be centred on itself: the policy would never move."""
    with pytest.raises(ConfigError, match="update_every = 1 with the ppo searcher's batch baseline learns nothing"):
        SearchConfig(update_every=1)
    with pytest.raises(ConfigError, match="reinforce"):
        SearchConfig(update_every=1, searcher="reinforce", hyperparameters={"baseline": "batch"})
    SearchConfig(update_every=1, hyperparameters={"baseline": "ema"})
    SearchConfig(update_every=1, searcher="evolution")


def test_advantages_are_centred_and_their_spread_floored():
    from nos.search.policy_gradient import advantages

    wide = advantages(torch.tensor([0.0, 1.0, 0.0, 1.0]), 0.5, 0.05)
    assert torch.allclose(wide, torch.tensor([-1.0, 1.0, -1.0, 1.0]) * 0.5 / torch.tensor([0.0, 1.0, 0.0, 1.0]).std())
    # Rewards that differ by a hair (rules at chance) get small advantages, not unit ones.
    hair = advantages(torch.tensor([0.100, 0.101, 0.100, 0.101]), 0.1005, 0.05)
    assert hair.abs().max() < 0.011


def test_the_warm_start_makes_the_builtins_likely_and_keeps_exploring():
    from nos.search.warm_start import builtin_mass, builtin_sequences

    sequences = torch.tensor(builtin_sequences(2))
    cold = make_searcher("ppo", depth=2, seed=0)
    warm = make_searcher("ppo", depth=2, seed=0, warm_start="builtins")
    assert builtin_mass(cold.controller, sequences) < 1e-6
    assert 0.1 <= builtin_mass(warm.controller, sequences) < 0.5
    assert 0 < warm.warm_steps < warm.config.warm_steps
    # Most samples are still other rules: the search goes on from the built-ins, not at them.
    texts = {p.text for p in warm.propose(200)}
    assert len(texts) > 40


def test_evolution_without_the_warm_start_begins_at_random():
    from nos.search.warm_start import builtin_sequences

    warm = make_searcher("evolution", depth=1, seed=0)
    cold = make_searcher("evolution", depth=1, seed=0, warm_start="none")
    builtins = set(builtin_sequences(1))
    assert {p.tokens for p in warm.propose(len(builtins))} == builtins
    assert not {p.tokens for p in cold.propose(len(builtins))} >= builtins


def _change(searcher, tokens, rewards, log_probs=None) -> float:
    before = [p.detach().clone() for p in searcher.controller.parameters()]
    searcher.observe(tokens, rewards, log_probs)
    return sum(float((p.detach() - b).abs().sum()) for p, b in zip(searcher.controller.parameters(), before))


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_results_of_the_policy_as_it_is_learn_as_on_policy_ones(name):
    # The asynchronous driver passes the log-probabilities rules were sampled with; when nothing was
    # learned since, they are the policy's own, and the update is the synchronous one.
    reward = target_reward(2)
    a, b = make_searcher(name, depth=2, seed=7), make_searcher(name, depth=2, seed=7)
    proposals = a.propose(10)
    assert all(p.log_prob is not None and p.log_prob < 0 for p in proposals)
    assert [p.log_prob for p in b.propose(10)] == [p.log_prob for p in proposals]
    tokens, rewards = [p.tokens for p in proposals], [reward(p.tokens) for p in proposals]
    a.observe(tokens, rewards)
    b.observe(tokens, rewards, [p.log_prob for p in proposals])
    for x, y in zip(a.controller.parameters(), b.controller.parameters()):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_a_result_the_policy_has_moved_far_from_teaches_almost_nothing(name):
    # Its weight min(1, pi_now / pi_sampled) is e^-30: a stale sample does not pass for the current policy's.
    reward = target_reward(2)
    fresh, stale = (make_searcher(name, depth=2, seed=7, entropy_weight=0.0) for _ in range(2))
    proposals = fresh.propose(10)
    stale.propose(10)
    tokens, rewards = [p.tokens for p in proposals], [reward(p.tokens) for p in proposals]
    moved = _change(fresh, tokens, rewards, [p.log_prob for p in proposals])
    barely = _change(stale, tokens, rewards, [p.log_prob + 30 for p in proposals])
    assert moved > 0
    assert barely < moved * 1e-3


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_making_a_searcher_leaves_the_global_generator_alone(name):
    """Its controller's weights come from its seed all the same (a script's own draws must not be reseeded)."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = make_searcher(name, depth=2, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = make_searcher(name, depth=2, seed=4)
    assert same_state(first.controller.state_dict(), second.controller.state_dict())
