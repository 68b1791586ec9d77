"""Capability retention: probe prompts, probe KL and a regulariser.

PPO sees only the game prompts' answers, so nothing in its loss (the KL
penalty included) holds the adapters to the base model anywhere else. Probes
are user messages outside the game (general questions, instructions) plus a
few in the game's framing that do not ask for an action. For each probe the
base (reference) model's greedy answer is computed once, and the adapted
model is teacher-forced on it:

  probe KL = mean over answer tokens t of KL(pi_adapter(. | x, y_<t) ||
             pi_ref(. | x, y_<t)),
  NLL      = mean over answer tokens t of -log pi_adapter(y_t | x, y_<t),

where x is the probe prompt and y the reference answer. The regulariser
`kl_coef * probe KL + ptx_coef * NLL` can be added to the PPO loss; the NLL
term is InstructGPT's PPO-ptx term (Ouyang et al., 2022) applied to the
reference answers in place of pretraining data.

The reference distributions come from the base model (no adapter) under
`stop_gradient` on every call, never from stored [N, R, V] arrays, because
the vocabulary of Gemma models alone is 262k entries.

Axis letters: A adapters, N probes, T prompt tokens, R answer tokens,
D model width, V vocabulary.
"""

import dataclasses
import importlib.resources
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl import prompts as prompts_lib
from moral_rl.games.payoffs import Game
from moral_rl.models import sampling, scoring
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer, positions_from_valid

SHIPPED_PROBES = "probes.json"  # In moral_rl/data/.
_PROBE_FIELDS = ("name", "text", "game")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe: a user message whose answer should not change.

    Attributes:
      name: a short unique identifier, used in logs.
      text: the user message. Game probes may name the action strings as
        {action_c} and {action_d}.
      game: put the game's rules and payoff table before the message.
    """

    name: str
    text: str
    game: bool = False


class ProbeArrays(NamedTuple):
    """Probe prompts and the reference model's greedy answers.

    Teacher forcing feeds the prompt, then the answer without its last
    token; the model's outputs at the last prompt position and at each fed
    answer token predict the R answer tokens.

    Attributes:
      prompt_tokens: [N, T] int32 left-padded rendered prompts.
      prompt_valid: [N, T] bool.
      answer_tokens: [N, R] int32 greedy answers, right-padded with the pad
        id after the stop token.
      answer_valid: [N, R] bool, True up to and including the stop token:
        the mask over the answer positions.
    """

    prompt_tokens: jax.Array
    prompt_valid: jax.Array
    answer_tokens: jax.Array
    answer_valid: jax.Array


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """Probes ready for a run.

    Attributes:
      probes: the Probe entries, in file order.
      texts: [N] rendered prompts (chat template applied).
      arrays: the ProbeArrays.
      reference_answers: [N] decoded greedy answers of the base model.
    """

    probes: tuple[Probe, ...]
    texts: tuple[str, ...]
    arrays: ProbeArrays
    reference_answers: tuple[str, ...]


class ProbeStatistics(NamedTuple):
    """Per-token means over the valid answer positions of all probes.

    Attributes:
      kl: [] mean KL(pi_adapter || pi_ref) in nats.
      nll: [] mean negative log-likelihood of the reference answers under
        the adapted model, in nats.
    """

    kl: jax.Array
    nll: jax.Array


# -- Loading and rendering -------------------------------------------------


def load_probes(path: str = "") -> tuple[Probe, ...]:
    """Load probes from a JSON file, or the shipped set when `path` is "".

    The file holds {"probes": [{"name": str, "text": str, "game": bool},
    ...]}, where "game" is optional (default false).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not valid JSON or an entry is malformed; the
        message names the file and the field.
    """
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Probe file {path!r} not found. Set "
                "config.retention.probes_file to an existing JSON file, or "
                "to '' for the probes shipped with moral_rl.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = path
    else:
        shipped = importlib.resources.files("moral_rl") / "data"
        text = (shipped / SHIPPED_PROBES).read_text(encoding="utf-8")
        source = f"moral_rl/data/{SHIPPED_PROBES}"

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"Probe file {source!r} is not valid JSON: {err.msg} at line "
            f"{err.lineno}, column {err.colno}. Fix the file's syntax."
        ) from err
    return parse_probes(data, source)


def parse_probes(data: Any, source: str = "<probes>") -> tuple[Probe, ...]:
    """Check decoded probe JSON and turn it into Probe entries.

    Args:
      data: the decoded JSON value.
      source: the file name, for error messages.

    Raises:
      ValueError: naming `source`, the entry and the field at fault.
    """
    example = '{"probes": [{"name": "capital", "text": "What is ...?"}]}'
    if not isinstance(data, dict) or "probes" not in data:
        raise ValueError(
            f"Probe file {source!r} must contain a JSON object with a "
            f"'probes' list, as in {example}.")
    entries = data["probes"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"Probe file {source!r}: 'probes' must be a non-empty list, got "
            f"{entries!r}. Add at least one entry, as in {example}.")

    probes, names = [], set()
    for index, entry in enumerate(entries):
        where = f"Probe file {source!r}, probes[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with 'name' and "
                             f"'text', got {entry!r}.")
        unknown = sorted(set(entry) - set(_PROBE_FIELDS))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; the "
                             f"fields are {', '.join(_PROBE_FIELDS)}.")
        for field in ("name", "text"):
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: field {field!r} is missing or not a "
                    f"non-empty string (got {value!r}).")
        game = entry.get("game", False)
        if not isinstance(game, bool):
            raise ValueError(f"{where}: field 'game' must be true or false, "
                             f"got {game!r}.")
        if entry["name"] in names:
            raise ValueError(f"{where}: name {entry['name']!r} is used "
                             "twice; give every probe its own name.")
        names.add(entry["name"])
        if game:
            try:
                entry["text"].format(action_c="C", action_d="D")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"{where}: text {entry['text']!r} has an invalid "
                    f"placeholder ({err!r}); game probes may use only "
                    "{action_c} and {action_d}, and '{{' for a brace."
                ) from err
        probes.append(Probe(name=entry["name"], text=entry["text"],
                            game=game))
    return tuple(probes)


def probe_messages(probe: Probe, game: Game, action_strings: Sequence[str],
                   system: str | None = None) -> list[dict]:
    """Return the chat messages of one probe.

    A game probe's message is the game's rules and payoff table, a blank
    line, then the probe text with {action_c} and {action_d} filled in.
    """
    content = probe.text
    if probe.game:
        question = probe.text.format(action_c=action_strings[0],
                                     action_d=action_strings[1])
        rules = prompts_lib.rules_text(game, action_strings)
        content = f"{rules}\n\n{question}"
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_probes(tokenizer, probes: Sequence[Probe], game: Game,
                  action_strings: Sequence[str],
                  system: str | None = None) -> tuple[str, ...]:
    """Render every probe in the model's chat template."""
    return tuple(
        tokenizer_lib.render_chat(
            tokenizer, probe_messages(probe, game, action_strings, system))
        for probe in probes)


# -- Probe arrays -----------------------------------------------------------


def greedy_answers(model: Transformer, variables, prompt_tokens, prompt_valid,
                   *, max_new_tokens: int, stop_tokens: tuple[int, ...],
                   pad_id: int) -> sampling.GenerateOutput:
    """Decode greedily from left-padded prompts, stopping at a stop token.

    Greedy decoding draws nothing, so the fixed key is never used.
    """
    return sampling.generate(
        model, variables, prompt_tokens, prompt_valid, jax.random.key(0),
        max_new_tokens=max_new_tokens, temperature=0.0,
        stop_tokens=tuple(stop_tokens), pad_id=pad_id)


def build_probe_arrays(model: Transformer, base_params, tokenizer,
                       texts: Sequence[str], *,
                       max_new_tokens: int) -> ProbeArrays:
    """Tokenise rendered probes and add the base model's greedy answers.

    Args:
      model: the base Transformer; a LoRA model runs as its base here.
      base_params: its parameters.
      tokenizer: the model's tokenizer.
      texts: [N] rendered prompts.
      max_new_tokens: R, the answer length; longer answers are cut.

    Returns:
      ProbeArrays; every answer has at least one valid token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    sequences = [tokenizer_lib.encode(tokenizer, text) for text in texts]
    prompt_tokens, prompt_valid = scoring.pad_left(sequences,
                                                   tokenizer.pad_token_id)
    prompt_tokens = jnp.asarray(prompt_tokens)
    prompt_valid = jnp.asarray(prompt_valid)
    answers = greedy_answers(
        model.clone(lora=None), {"params": base_params}, prompt_tokens,
        prompt_valid, max_new_tokens=max_new_tokens,
        stop_tokens=tuple(tokenizer_lib.stop_token_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id)
    return ProbeArrays(prompt_tokens=prompt_tokens, prompt_valid=prompt_valid,
                       answer_tokens=answers.tokens,
                       answer_valid=answers.valid)


def decode_answers(tokenizer, tokens, valid) -> tuple[str, ...]:
    """Decode [N, R] answer tokens, dropping padding and special tokens."""
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    return tuple(
        tokenizer.decode(row[mask].tolist(), skip_special_tokens=True)
        for row, mask in zip(tokens, valid))


def build_probe_set(model: Transformer, base_params, tokenizer,
                    probes: Sequence[Probe], game: Game,
                    action_strings: Sequence[str], *, max_new_tokens: int,
                    system: str | None = None) -> ProbeSet:
    """Render probes and compute the base model's greedy answers."""
    texts = render_probes(tokenizer, probes, game, action_strings, system)
    arrays = build_probe_arrays(model, base_params, tokenizer, texts,
                                max_new_tokens=max_new_tokens)
    return ProbeSet(probes=tuple(probes), texts=texts, arrays=arrays,
                    reference_answers=decode_answers(
                        tokenizer, arrays.answer_tokens, arrays.answer_valid))


# -- Probe KL, NLL and the regulariser --------------------------------------


def _answer_hidden(model: Transformer, variables, probes: ProbeArrays):
    """Final hidden states [N, R, D] that predict the R answer tokens."""
    prompt_len = probes.prompt_tokens.shape[1]
    tokens = jnp.concatenate(
        [probes.prompt_tokens, probes.answer_tokens[:, :-1]], axis=1)
    valid = jnp.concatenate(
        [probes.prompt_valid, probes.answer_valid[:, :-1]], axis=1)
    scoring.check_context(tokens.shape[1] + 1, model.config)
    hidden, _ = model.apply(variables, tokens, positions_from_valid(valid),
                            valid)
    return hidden[:, prompt_len - 1:]


def probe_statistics(model: Transformer, base_params, adapter,
                     probes: ProbeArrays, *,
                     rows_per_chunk: int = 4) -> ProbeStatistics:
    """Probe KL and reference-answer NLL of one adapter.

    Direction: KL(pi_adapter || pi_ref), the direction of the PPO penalty
    and of `kl/reference`, so both read on one scale. It is large where the
    adapter puts mass on tokens the base model would not emit (the stream
    of action tokens after aggressive training), and it is exactly zero at
    B = 0. The NLL term of `regulariser` covers the other side, mass that
    the adapter takes away from the reference answer.

    Args:
      model: the Transformer with LoRA; its `lora=None` clone is the
        reference.
      base_params: frozen base parameters.
      adapter: {"lora": one adapter tree, ...}, or None for the base model.
      probes: ProbeArrays.
      rows_per_chunk: probes whose [R, V] logits are held at once. Each
        chunk's logits are recomputed in the backward pass, so memory holds
        one chunk of logits, not N.

    Returns:
      ProbeStatistics of per-token means over valid answer positions.
    """
    base_model = model.clone(lora=None)
    base_variables = {"params": base_params}
    ref_hidden = jax.lax.stop_gradient(
        _answer_hidden(base_model, base_variables, probes))  # [N, R, D]
    if adapter is None:
        hidden = ref_hidden
    else:
        hidden = _answer_hidden(
            model, {"params": base_params, "lora": adapter["lora"]}, probes)

    # LoRA never touches the output layer, so one unembedding serves both.
    def unembed(h):
        return base_model.apply(base_variables, h, method=Transformer.unembed)

    @jax.checkpoint
    def per_probe(args):
        h, h_ref, targets = args  # [R, D], [R, D], [R]
        log_p = jax.nn.log_softmax(unembed(h), axis=-1)  # [R, V]
        log_q = jax.lax.stop_gradient(
            jax.nn.log_softmax(unembed(h_ref), axis=-1))
        p = jnp.exp(log_p)
        kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
        nll = -jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0]
        return kl, nll  # [R], [R]

    kl, nll = jax.lax.map(per_probe,
                          (hidden, ref_hidden, probes.answer_tokens),
                          batch_size=rows_per_chunk)  # [N, R] each
    mask = probes.answer_valid.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    return ProbeStatistics(kl=jnp.sum(kl * mask) / count,
                           nll=jnp.sum(nll * mask) / count)


@dataclasses.dataclass(frozen=True)
class RegulariserCoefs:
    """Weights of the retention terms added to the PPO loss.

    Attributes:
      kl_coef: weight of the probe KL.
      ptx_coef: weight of the reference answers' NLL (PPO-ptx).
    """

    kl_coef: float
    ptx_coef: float


def regulariser(model: Transformer, base_params, adapter,
                probes: ProbeArrays, coefs: RegulariserCoefs, *,
                rows_per_chunk: int = 4):
    """Retention loss kl_coef * probe KL + ptx_coef * NLL of one adapter.

    Args:
      model, base_params, adapter, probes, rows_per_chunk: see
        `probe_statistics`.
      coefs: the two weights.

    Returns:
      (loss [], aux dict with retention_loss, retention_kl and
      retention_nll).
    """
    stats = probe_statistics(model, base_params, adapter, probes,
                             rows_per_chunk=rows_per_chunk)
    loss = coefs.kl_coef * stats.kl + coefs.ptx_coef * stats.nll
    return loss, {"retention_loss": loss, "retention_kl": stats.kl,
                  "retention_nll": stats.nll}


# -- Metrics ----------------------------------------------------------------


def retention_metrics(model: Transformer, base_params, adapter,
                      probes: ProbeArrays, *, stop_tokens: tuple[int, ...],
                      pad_id: int, rows_per_chunk: int = 4) -> dict:
    """Probe KL, unchanged fraction and greedy answers of one adapter.

    An answer is unchanged when the adapter's greedy answer has the same
    tokens and the same length as the reference answer (both cut at R
    tokens). Callers vmap this over the adapter axis.

    Returns:
      {"probe_kl": [], "unchanged_fraction": [], "answer_tokens": [N, R],
      "answer_valid": [N, R]}.
    """
    stats = probe_statistics(model, base_params, adapter, probes,
                             rows_per_chunk=rows_per_chunk)
    variables = {"params": base_params}
    if adapter is not None:
        variables["lora"] = adapter["lora"]
    answers = greedy_answers(
        model if adapter is not None else model.clone(lora=None), variables,
        probes.prompt_tokens, probes.prompt_valid,
        max_new_tokens=probes.answer_tokens.shape[1],
        stop_tokens=stop_tokens, pad_id=pad_id)
    same = (jnp.all(answers.tokens == probes.answer_tokens, axis=-1)
            & jnp.all(answers.valid == probes.answer_valid, axis=-1))
    return {"probe_kl": stats.kl,
            "unchanged_fraction": jnp.mean(same.astype(jnp.float32)),
            "answer_tokens": answers.tokens, "answer_valid": answers.valid}


def scalar_metrics(measured: dict) -> dict:
    """Pick the per-adapter scalars of `retention_metrics` for logging."""
    return {"retention/probe_kl": np.asarray(measured["probe_kl"]),
            "retention/unchanged_fraction": np.asarray(
                measured["unchanged_fraction"])}


def answers_markdown(probe_set: ProbeSet, adapter_answers) -> str:
    """Render reference and adapter answers as Markdown for TensorBoard.

    Args:
      probe_set: the run's ProbeSet.
      adapter_answers: [A] sequences of [N] decoded answers.
    """
    blocks = []
    for index, probe in enumerate(probe_set.probes):
        reference = _one_line(probe_set.reference_answers[index])
        lines = [f"**{probe.name}**: {probe.text}", "",
                 f"- reference: {reference}"]
        for adapter, answers in enumerate(adapter_answers):
            lines.append(f"- adapter {adapter}: {_one_line(answers[index])}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _one_line(text: str) -> str:
    # Markdown list items end at a blank line; keep each answer on one line.
    return " ".join(text.split()) or "(empty)"


def is_due(step: int, every: int, num_updates: int) -> bool:
    """Whether update `step` (counted from 1) records a rate-`every` item.

    `every` = 0 turns the item off; otherwise the last update records too.
    """
    return every > 0 and (step % every == 0 or step == num_updates)
