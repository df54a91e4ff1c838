"""Regularized evolution: warm start, one-token mutations, ageing, exact resumes, real progress."""

from __future__ import annotations

import pytest

from nos.config import ConfigError, SearchConfig
from nos.rules import from_tokens, min_depth, parse, to_text, to_tokens
from nos.rules.builtins import BUILTINS
from nos.rules.vocabulary import TOKENS, position_kinds, sequence_length
from nos.search import EvolutionSearcher, make_searcher, state_from_bytes, state_to_bytes
from nos.search.evolution import builtin_sequences

from helpers.search import run, same_state, target_reward


def texts(proposals) -> list[str]:
    return [p.text for p in proposals]


def test_the_warm_start_proposes_the_builtins_that_fit_first():
    # Depth 3 holds all but the decayed AddSigns; depth 2 neither the decays nor AddSign's sum.
    fit = [to_text(parse(t)) for t in BUILTINS.values() if min_depth(parse(t)) is not None]
    assert len(fit) == len(BUILTINS) - 3
    deep = make_searcher("evolution", depth=3, seed=0)
    assert texts(deep.propose(len(fit))) == fit
    shallow = make_searcher("evolution", depth=2, seed=0)
    first = texts(shallow.propose(20))
    assert first[:5] == ["g", "m", "adam", "rmsprop", "g * exp(sign(g) * sign(m))"]
    assert "(1 + sign(g) * sign(m)) * g" not in first   # needs depth 3
    assert [to_text(from_tokens(t, 1)) for t in builtin_sequences(1)] == ["g", "m", "adam", "rmsprop"]


def test_the_warm_start_fills_the_population_before_any_child():
    searcher = make_searcher("evolution", depth=2, seed=1, population=12, tournament=3)
    searcher.propose(8)
    searcher.propose(8)
    assert searcher.warm_proposed == 16   # nothing scored yet: no parents, so random members still
    searcher = make_searcher("evolution", depth=2, seed=1, population=12, tournament=3)
    first = searcher.propose(8)
    searcher.observe([p.tokens for p in first], [0.5] * 8)
    second = searcher.propose(8)    # 4 warm members complete the population, then 4 children
    assert searcher.warm_proposed == 12
    parents = {p.tokens for p in first}
    children = [p.tokens for p in second[4:]]
    assert all(any(sum(a != b for a, b in zip(c, parent)) == 1 for parent in parents) for c in children)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_children_decode_and_differ_from_a_member_in_exactly_one_token(depth):
    reward = target_reward(depth)
    searcher = make_searcher("evolution", depth=depth, seed=2, population=10, tournament=4)
    run(searcher, reward, 1, batch_size=10)     # the warm start, scored
    for _ in range(5):
        members = [m[0] for m in searcher.population]
        proposals = searcher.propose(10)
        for p in proposals:
            assert len(p.tokens) == sequence_length(depth)
            assert [TOKENS[t].kind for t in p.tokens] == list(position_kinds(depth))
            assert from_tokens(p.tokens, depth) == p.tree
            assert min(sum(a != b for a, b in zip(p.tokens, m)) for m in members) == 1
        searcher.observe([p.tokens for p in proposals], [reward(p.tokens) for p in proposals])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_mutation_changes_one_token_and_the_rule(depth):
    searcher = make_searcher("evolution", depth=depth, seed=3)
    # Mostly dead code: `g` passed through keep-left at every level.
    parents = [tuple(to_tokens(parse("g"), depth))] + [p.tokens for p in searcher.propose(60)]
    for parent in parents:
        for _ in range(5):
            child = searcher.mutate(parent)
            changed = [i for i, (a, b) in enumerate(zip(parent, child)) if a != b]
            assert len(changed) == 1
            assert TOKENS[child[changed[0]]].kind == TOKENS[parent[changed[0]]].kind
            assert to_text(from_tokens(child, depth)) != to_text(from_tokens(parent, depth))


def test_the_oldest_member_is_evicted_whatever_its_reward():
    searcher = make_searcher("evolution", depth=1, seed=0, population=3, tournament=2)
    rows = [p.tokens for p in searcher.propose(5)]
    searcher.observe(rows[:2], [0.9, 0.1])
    assert [m[0] for m in searcher.population] == rows[:2]
    searcher.observe(rows[2:], [0.2, 0.3, 0.4])
    # The best (0.9) was the oldest: gone.
    assert list(searcher.population) == [(rows[2], 0.2), (rows[3], 0.3), (rows[4], 0.4)]


def test_the_tournament_winner_is_the_best_drawn():
    searcher = make_searcher("evolution", depth=1, seed=0, population=6, tournament=6)
    rows = [p.tokens for p in searcher.propose(6)]
    searcher.observe(rows, [0.1, 0.5, 0.9, 0.3, 0.0, 0.2])
    assert all(searcher.select() == rows[2] for _ in range(20))   # the whole population is drawn
    searcher = make_searcher("evolution", depth=1, seed=0, population=6, tournament=1)
    searcher.observe(rows, [0.1, 0.5, 0.9, 0.3, 0.0, 0.2])
    assert len({searcher.select() for _ in range(60)}) > 3         # a tournament of one: any member


def test_a_checkpoint_taken_after_proposing_resumes_exactly():
    # The driver's protocol: checkpoint right after propose; a restored searcher observes that batch.
    reward = target_reward(2)
    straight = make_searcher("evolution", depth=2, seed=5, population=15, tournament=4)
    run(straight, reward, 1, batch_size=10)    # mid warm start: 10 of 15 proposed
    open_batch = straight.propose(10)           # 5 warm members, 5 children
    saved = state_to_bytes(straight.state_dict())
    straight.observe([p.tokens for p in open_batch], [reward(p.tokens) for p in open_batch])
    after = run(straight, reward, 4, batch_size=10)

    restored = make_searcher("evolution", depth=2, seed=99, population=15, tournament=4)
    restored.load_state_dict(state_from_bytes(saved))
    restored.observe([list(p.tokens) for p in open_batch], [reward(p.tokens) for p in open_batch])
    assert run(restored, reward, 4, batch_size=10) == after
    assert same_state(restored.state_dict(), straight.state_dict())


def test_evolution_climbs_where_random_search_cannot():
    reward = target_reward(2)
    random_rewards = run(make_searcher("random", depth=2, seed=0), reward, 20)
    evolved = run(make_searcher("evolution", depth=2, seed=0), reward, 20)
    random_last, first, last = sum(random_rewards[-100:]) / 100, sum(evolved[:100]) / 100, sum(evolved[-100:]) / 100
    assert last > random_last + 0.3, (last, random_last)
    assert last > first + 0.3, (last, first)
    assert max(evolved) > max(random_rewards) + 0.2


def test_evolution_settings_and_bad_ones():
    config = SearchConfig(searcher="evolution", hyperparameters={"population": 20, "tournament": 5})
    searcher = make_searcher(config.searcher, config.depth, config.seed, **config.hyperparameters)
    assert isinstance(searcher, EvolutionSearcher)
    assert searcher.config.population == 20
    with pytest.raises(ConfigError, match="unknown hyperparameters lr"):
        SearchConfig(searcher="evolution", hyperparameters={"lr": 0.1})
    with pytest.raises(ConfigError, match="tournament"):
        SearchConfig(searcher="evolution", hyperparameters={"population": 4, "tournament": 5})
    with pytest.raises(ConfigError, match="population"):
        SearchConfig(searcher="evolution", hyperparameters={"population": 0})
    with pytest.raises(ConfigError, match="unknown hyperparameters population"):
        SearchConfig(searcher="ppo", hyperparameters={"population": 4})
    with pytest.raises(TypeError):
        make_searcher("evolution", lr=0.1)
    with pytest.raises(ValueError, match="hyperparameters"):
        searcher.load_state_dict(make_searcher("evolution", depth=2, population=30).state_dict())
    with pytest.raises(ValueError, match="searcher"):
        searcher.load_state_dict(make_searcher("random", depth=2).state_dict())
