"""Capability retention: probe files, probe arrays, probe KL, regulariser.

Pins: the shipped probe file loads and bad files raise errors naming the
file and field; probe arrays hold left-padded prompts and greedy answers
with a prefix mask; probe KL and NLL match a direct computation, are zero
(KL) for an adapter with B = 0 and positive after B moves; a very large
kl_coef holds the probe KL near zero in training where a high learning
rate alone moves it; the train loop logs the metrics and answer texts.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import ipd
from configs import retention as retention_config
from moral_rl import learner, retention, run_config, train
from moral_rl.games import payoffs
from moral_rl.models import loading, lora as lora_lib, scoring
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer

PD = payoffs.get_game("prisoners_dilemma")
STRINGS = ("action1", "action2")


def _write(tmp_path, content):
    path = tmp_path / "probes.json"
    path.write_text(content if isinstance(content, str)
                    else json.dumps(content))
    return str(path)


# -- Probe files --------------------------------------------------------------


def test_shipped_probes_cover_both_kinds():
    probes = retention.load_probes()

    neutral = [p for p in probes if not p.game]
    game = [p for p in probes if p.game]
    assert len(neutral) >= 20
    assert len(game) >= 3
    assert len({p.name for p in probes}) == len(probes)
    assert any("capital of France" in p.text for p in neutral)


def test_game_probe_follows_rules_text():
    probe = retention.Probe("both_d", "What if both play {action_d}?",
                            game=True)

    (message,) = retention.probe_messages(probe, PD, STRINGS)

    assert message["role"] == "user"
    assert message["content"].startswith("You are playing a game")
    assert "you get 1, they get 1" in message["content"]
    assert message["content"].endswith("What if both play action2?")


def test_neutral_probe_keeps_braces_and_system():
    probe = retention.Probe("braces", "Explain {x} in set notation.")

    system, user = retention.probe_messages(probe, PD, STRINGS, "Be brief.")

    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"] == "Explain {x} in set notation."


def test_missing_probe_file_names_path(tmp_path):
    path = str(tmp_path / "absent.json")

    with pytest.raises(FileNotFoundError, match="absent.json"):
        retention.load_probes(path)


def test_malformed_json_names_line(tmp_path):
    path = _write(tmp_path, '{"probes": [\n  {"name": "a", "text": }]}')

    with pytest.raises(ValueError, match=r"not valid JSON.*line 2"):
        retention.load_probes(path)


@pytest.mark.parametrize("content, message", [
    ([{"name": "a", "text": "b"}], "'probes' list"),
    ({"items": []}, "'probes' list"),
    ({"probes": []}, "non-empty list"),
    ({"probes": ["What?"]}, r"probes\[0\] must be an object"),
    ({"probes": [{"name": "a"}]}, r"probes\[0\]: field 'text' is missing"),
    ({"probes": [{"text": "b"}]}, r"probes\[0\]: field 'name' is missing"),
    ({"probes": [{"name": "a", "text": "  "}]}, "field 'text'"),
    ({"probes": [{"name": "a", "txt": "b"}]}, r"unknown field\(s\) \['txt'\]"),
    ({"probes": [{"name": "a", "text": "b", "game": "yes"}]},
     "'game' must be true or false"),
    ({"probes": [{"name": "a", "text": "b"}, {"name": "a", "text": "c"}]},
     r"probes\[1\]: name 'a' is used twice"),
    ({"probes": [{"name": "a", "text": "Play {action_x}.", "game": True}]},
     "invalid placeholder"),
])
def test_malformed_probe_file_names_field(tmp_path, content, message):
    path = _write(tmp_path, content)

    with pytest.raises(ValueError, match=message) as info:
        retention.load_probes(path)
    assert path in str(info.value)


def test_custom_probe_file_loads(tmp_path):
    path = _write(tmp_path, {"probes": [
        {"name": "a", "text": "Hello?"},
        {"name": "b", "text": "Rules?", "game": True}]})

    probes = retention.load_probes(path)

    assert probes == (retention.Probe("a", "Hello?"),
                      retention.Probe("b", "Rules?", game=True))


def test_is_due_rates():
    assert [retention.is_due(s, 4, 10) for s in range(1, 11)] == [
        False, False, False, True, False, False, False, True, False, True]
    assert not any(retention.is_due(s, 0, 10) for s in range(1, 11))


# -- Config ---------------------------------------------------------------


def _config(**retention_fields):
    config = ipd.get_config("utilitarian")
    for field, value in retention_fields.items():
        config.retention[field] = value
    return config


def test_default_retention_settings():
    settings = run_config.validate(_config()).retention

    assert settings.coefs is None
    assert settings.every == 4
    assert len(settings.probes) == len(retention.load_probes())


def test_retention_off_loads_no_probes():
    settings = run_config.validate(_config(
        every=0, text_every=0, probes_file="/absent.json")).retention

    assert not settings.needs_probes
    assert settings.probes == ()


def test_coefficients_build_regulariser():
    settings = run_config.validate(_config(kl_coef=2.0, ptx_coef=0.5,
                                           num_probes=3)).retention

    assert settings.coefs == retention.RegulariserCoefs(2.0, 0.5)
    assert len(settings.probes) == 3


@pytest.mark.parametrize("field, value, message", [
    ("every", -1, "config.retention.every=-1"),
    ("text_every", -2, "config.retention.text_every=-2"),
    ("num_probes", 1000, "config.retention.num_probes=1000"),
    ("max_new_tokens", 0, "config.retention.max_new_tokens=0"),
    ("kl_coef", -0.1, "config.retention.kl_coef=-0.1"),
    ("ptx_coef", float("inf"), "config.retention.ptx_coef=inf"),
    ("probes_file", "/absent/probes.json",
     "config.retention.probes_file='/absent/probes.json'"),
])
def test_invalid_retention_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_config.validate(_config(**{field: value}))


def test_malformed_probes_file_fails_validation(tmp_path):
    path = _write(tmp_path, {"probes": []})

    with pytest.raises(ValueError, match="non-empty list"):
        run_config.validate(_config(probes_file=path))


def test_retention_config_switch():
    plain = retention_config.get_config()
    regularised = retention_config.get_config("regularised")

    for config in (plain, regularised):
        run_config.validate(config)
        assert config.lora.rank == 16
        assert config.optimizer.learning_rate == 1e-3
        assert config.reward == "utilitarian"
        assert config.opponent == "tit_for_tat"
    assert plain.retention.kl_coef == plain.retention.ptx_coef == 0.0
    assert regularised.retention.kl_coef > 0
    assert regularised.retention.ptx_coef > 0


# -- Probe arrays, KL and NLL on a tiny model -------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_factory):
    checkpoint = tiny_llama_factory(head_scale=0.5, seed=11)
    source = loading.resolve_source(checkpoint.folder)
    config, params = loading.load_config_and_params(source)
    tokenizer = tokenizer_lib.load_tokenizer(source)
    spec = lora_lib.make_lora_spec(4, 8.0, "all")
    return Transformer(config, spec), params, tokenizer


@pytest.fixture(scope="module")
def probe_set(tiny_model):
    model, params, tokenizer = tiny_model
    shipped = retention.load_probes()
    probes = [p for p in shipped if not p.game][:3] + [
        p for p in shipped if p.game][:2]
    return retention.build_probe_set(model, params, tokenizer, probes, PD,
                                     STRINGS, max_new_tokens=6)


def _adapter(model, seed, b_scale):
    """One adapter: the usual random A, and B zero or normal(0, b_scale)."""
    lora = lora_lib.select_adapter(
        lora_lib.init_lora(jax.random.key(seed), model.config, model.lora),
        0)
    if b_scale:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        lora = jax.tree_util.tree_unflatten(treedef, [
            b_scale * jax.random.normal(k, leaf.shape)
            if path[-1].key == "b" else leaf
            for (path, leaf), k in zip(leaves, keys)])
    return {"lora": lora}


def test_probe_arrays_shapes_and_masks(probe_set, tiny_model):
    _, _, tokenizer = tiny_model
    arrays = probe_set.arrays
    prompt_valid = np.asarray(arrays.prompt_valid)
    answer_valid = np.asarray(arrays.answer_valid)

    assert arrays.prompt_tokens.shape == prompt_valid.shape
    assert arrays.prompt_tokens.shape[0] == 5
    assert arrays.answer_tokens.shape == answer_valid.shape == (5, 6)
    # Prompts are left-padded: each row is False..., then True...
    assert np.all(np.diff(prompt_valid.astype(int), axis=1) >= 0)
    assert prompt_valid[:, -1].all()
    # Answers are a prefix mask with at least one token.
    assert np.all(np.diff(answer_valid.astype(int), axis=1) <= 0)
    assert answer_valid[:, 0].all()
    for row, text in enumerate(probe_set.texts):
        own = np.asarray(arrays.prompt_tokens)[row][prompt_valid[row]]
        assert own.tolist() == tokenizer_lib.encode(tokenizer, text)
    assert "payoff table" in probe_set.texts[3]
    assert len(probe_set.reference_answers) == 5


def test_greedy_answers_stop_and_pad(probe_set, tiny_model):
    model, params, tokenizer = tiny_model
    arrays = probe_set.arrays
    stop = int(arrays.answer_tokens[0, 2])

    out = retention.greedy_answers(
        model.clone(lora=None), {"params": params}, arrays.prompt_tokens,
        arrays.prompt_valid, max_new_tokens=6, stop_tokens=(stop,),
        pad_id=tokenizer.pad_token_id)

    first_stop = int(np.argmax(np.asarray(out.tokens[0]) == stop))
    assert first_stop <= 2
    assert np.asarray(out.valid[0]).tolist() == (
        [True] * (first_stop + 1) + [False] * (5 - first_stop))
    assert np.all(np.asarray(out.tokens[0, first_stop + 1:])
                  == tokenizer.pad_token_id)


def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _direct_statistics(model, params, adapter, arrays):
    """Probe KL and NLL from right-padded full sequences, in float64.

    The layout differs from `retention`'s (left-padded prompt, then the
    answer), so a wrong offset between the two would show.
    """
    rows = []
    for row in range(arrays.prompt_tokens.shape[0]):
        prompt = np.asarray(arrays.prompt_tokens[row])[
            np.asarray(arrays.prompt_valid[row])]
        answer = np.asarray(arrays.answer_tokens[row])[
            np.asarray(arrays.answer_valid[row])]
        rows.append((prompt, answer))
    tokens, valid = scoring.pad_right(
        [np.concatenate([p, a[:-1]]) for p, a in rows], 0)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    # Row and column of the output that predicts each answer token.
    row_index = np.concatenate([np.full(len(a), r)
                                for r, (_, a) in enumerate(rows)])
    column = np.concatenate([np.arange(len(a)) + len(p) - 1
                             for p, a in rows])
    targets = np.concatenate([a for _, a in rows])

    def log_probs(module, variables):
        hidden, _ = module.apply(variables, tokens, positions, valid)
        return _log_softmax64(module.apply(
            variables, hidden[row_index, column],
            method=Transformer.unembed))  # [answer tokens, V]

    log_p = log_probs(model, {"params": params, "lora": adapter["lora"]})
    log_q = log_probs(model.clone(lora=None), {"params": params})
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    nll = -log_p[np.arange(len(targets)), targets]
    return float(kl.mean()), float(nll.mean())


def test_statistics_match_direct_computation(probe_set, tiny_model):
    model, params, _ = tiny_model
    adapter = _adapter(model, seed=3, b_scale=0.05)

    stats = retention.probe_statistics(model, params, adapter,
                                       probe_set.arrays, rows_per_chunk=2)
    kl, nll = _direct_statistics(model, params, adapter, probe_set.arrays)

    assert kl > 1e-4
    np.testing.assert_allclose(float(stats.kl), kl, rtol=1e-3)
    np.testing.assert_allclose(float(stats.nll), nll, rtol=1e-4)


def test_base_nll_matches_scoring(probe_set, tiny_model):
    model, params, _ = tiny_model
    arrays = probe_set.arrays
    base = model.clone(lora=None)

    stats = retention.probe_statistics(model, params, None, arrays)
    score_fn = jax.jit(functools.partial(scoring.score_continuations, base))

    total, count = 0.0, 0
    for row in range(arrays.prompt_tokens.shape[0]):
        answer = np.asarray(arrays.answer_tokens[row])[
            np.asarray(arrays.answer_valid[row])]
        score = score_fn(
            {"params": params}, arrays.prompt_tokens[row:row + 1],
            arrays.prompt_valid[row:row + 1], jnp.asarray(answer)[None],
            jnp.ones((1, len(answer)), bool))
        total -= float(score.log_probs[0, 0])
        count += len(answer)
    assert float(stats.kl) == 0.0
    np.testing.assert_allclose(float(stats.nll), total / count, rtol=1e-4)


def test_kl_zero_at_init_positive_after_perturbing(probe_set, tiny_model):
    model, params, tokenizer = tiny_model
    metrics = jax.jit(lambda adapter: retention.retention_metrics(
        model, params, adapter, probe_set.arrays,
        stop_tokens=tuple(tokenizer_lib.stop_token_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id))

    at_init = metrics(_adapter(model, seed=5, b_scale=0.0))
    moved = metrics(_adapter(model, seed=5, b_scale=0.5))

    assert abs(float(at_init["probe_kl"])) < 1e-6
    assert float(at_init["unchanged_fraction"]) == 1.0
    np.testing.assert_array_equal(at_init["answer_tokens"],
                                  probe_set.arrays.answer_tokens)
    assert float(moved["probe_kl"]) > 1e-2
    assert float(moved["unchanged_fraction"]) < 1.0


def test_regulariser_combines_terms_with_gradient(probe_set, tiny_model):
    model, params, _ = tiny_model
    adapter = _adapter(model, seed=7, b_scale=0.0)
    coefs = retention.RegulariserCoefs(kl_coef=3.0, ptx_coef=0.5)

    def loss(adapter):
        return retention.regulariser(model, params, adapter,
                                     probe_set.arrays, coefs)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(adapter)

    np.testing.assert_allclose(
        value, 3.0 * aux["retention_kl"] + 0.5 * aux["retention_nll"],
        rtol=1e-6)
    # At B = 0 the KL is at its minimum, so the gradient is the NLL's,
    # which reaches the adapters' B through every targeted layer.
    b_norm = jnp.linalg.norm(grads["lora"]["layers"]["mlp"]["down"]["b"])
    assert float(b_norm) > 0


# -- Training ---------------------------------------------------------------


def _tiny_config(folder, *, kl_coef, learning_rate):
    config = ipd.get_config("utilitarian,smoke")
    config.model.name = folder
    config.lora.rank = 4
    config.optimizer.learning_rate = learning_rate
    config.ppo.epochs = 2
    # Raw rewards keep a value-loss gradient on the tiny model, whose
    # answers are almost all illegal (see test_learner).
    config.ppo.reward_norm = False
    config.ppo.reward_scaling = False
    config.retention.num_probes = 4
    config.retention.max_new_tokens = 6
    config.retention.kl_coef = kl_coef
    return config


def _probe_kl_after(folder, num_updates, **config_fields):
    run = train.build_run(_tiny_config(folder, **config_fields))
    update = jax.jit(lambda s, i: learner.update_step(
        s, i, settings=run.step_settings))
    state = run.state
    for _ in range(num_updates):
        state, metrics = update(state, run.inputs)
    stats = jax.vmap(retention.probe_statistics,
                     in_axes=(None, None, 0, None))(
        run.step_settings.model, run.inputs.base_params,
        state.agents.adapter, run.inputs.probes)
    return float(stats.kl[0]), metrics


@pytest.fixture(scope="module")
def train_folder(tiny_llama_factory):
    return tiny_llama_factory(head_scale=0.5, seed=5).folder


@pytest.mark.slow
def test_large_kl_coef_holds_probe_kl(train_folder):
    # At 3e-3 the adapters move the probe KL to about 0.5 nats in 12 Adam
    # steps. Much higher rates take steps too coarse for any weight on
    # the KL to hold it.
    free_kl, free_metrics = _probe_kl_after(train_folder, 6, kl_coef=0.0,
                                            learning_rate=3e-3)
    held_kl, held_metrics = _probe_kl_after(train_folder, 6, kl_coef=1e4,
                                            learning_rate=3e-3)

    assert "ppo/retention_kl" not in free_metrics
    assert "ppo/retention_kl" in held_metrics
    assert free_kl > 0.05
    assert held_kl < 0.01 * free_kl


@pytest.mark.slow
def test_train_loop_logs_retention(train_folder, tmp_path):
    config = _tiny_config(train_folder, kl_coef=1.0, learning_rate=1e-3)
    config.num_updates = 3
    config.retention.every = 2
    config.retention.text_every = 3
    config.log_every = 2

    final = train.train_and_evaluate(config, str(tmp_path))

    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    kl_steps = [r["step"] for r in records if "retention/probe_kl" in r]
    assert kl_steps == [2, 3]
    assert all(0.0 <= r["retention/unchanged_fraction"] <= 1.0
               for r in records if "retention/unchanged_fraction" in r)
    assert len(final["retention/probe_kl"]) == 1
    assert len(final["ppo/retention_kl"]) == 1

    events = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    texts = events.Tensors("retention/answers")
    assert [t.step for t in texts] == [0, 3]
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert "- reference:" in last and "- adapter 0:" in last
    assert os.path.isfile(tmp_path / "final_metrics.json")
