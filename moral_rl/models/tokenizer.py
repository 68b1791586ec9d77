"""Tokenizers and chat templates, through `transformers`.

A tokenizer comes from a Hugging Face folder or from GGUF metadata. The
tokenizer converted from GGUF is saved under a cache folder and reloaded
from there on later runs, which skips reading the vocabulary arrays.
"""

import hashlib
import os
import shutil

from moral_rl.models.loading import ModelSource, open_gguf

# Used when a tokenizer has no chat template (base models such as
# gemma-3-270m): plain turns that a base model can continue.
_FALLBACK_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: "}


def cache_dir() -> str:
    """Return the folder for converted tokenizers.

    `MORAL_RL_CACHE` overrides the default `~/.cache/moral_rl`.
    """
    root = os.environ.get("MORAL_RL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "moral_rl")
    return os.path.join(root, "tokenizers")


def _gguf_cache_key(path: str) -> str:
    stat = os.stat(path)
    identity = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def tokenizer_from_gguf(path: str):
    """Build a fast tokenizer from the metadata of a GGUF file.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` in transformers 5
    imports PyTorch to read the file, and moral_rl runs without PyTorch, so
    the metadata is read with the `gguf` package and handed to the same
    converter transformers uses.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    reader = open_gguf(path)
    metadata = {
        key: field.contents() for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"]
                for key, name in renames.items()
                if f"tokenizer.{key}" in metadata}
        for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict = grouped["tokenizer"]
    tokenizer_config = grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens metadata, so "
                         "no tokenizer can be built from it.")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file
        # disables it.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in mapping._SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = (
            None if token_id is None else tokenizer_dict["tokens"][token_id])

    backend, extra = mapping.convert_gguf_tokenizer(
        metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend,
                                   **tokenizer_config, **extra)


def load_tokenizer(source: ModelSource):
    """Load the tokenizer of a resolved model source.

    Returns:
      A `transformers` tokenizer with `pad_token_id` set.
    """
    from transformers import AutoTokenizer

    if source.kind == "hf":
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    else:
        cached = os.path.join(cache_dir(), _gguf_cache_key(source.path))
        if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            tokenizer = tokenizer_from_gguf(source.path)
            # Save into a temporary folder and rename it, so an interrupted
            # save never leaves a cache entry that looks complete.
            partial = f"{cached}.partial-{os.getpid()}"
            tokenizer.save_pretrained(partial)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            try:
                os.replace(partial, cached)
            except OSError:  # Another process saved it first.
                shutil.rmtree(partial, ignore_errors=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_system_role(tokenizer) -> bool:
    """Whether the chat template accepts a system message.

    Gemma's template raises on a system turn; the check renders one.
    """
    if not tokenizer.chat_template:
        return False
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"},
             {"role": "user", "content": "u"}], tokenize=False)
    except Exception:  # jinja raises TemplateError from the template.
        return False
    return True


def render_chat(tokenizer, messages: list[dict], *,
                add_generation_prompt: bool = True) -> str:
    """Render chat messages as the model's prompt text.

    A system message is folded into the first user turn when the template
    has no system role (Gemma). Without any chat template, turns are written
    as "User: ..." / "Assistant: ..." lines.
    """
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system" and not has_system_role(
            tokenizer):
        system = messages.pop(0)["content"]
        if messages and messages[0]["role"] == "user":
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "user", "content": system})

    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            messages, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    lines = [_FALLBACK_ROLES[m["role"]] + m["content"] for m in messages]
    text = "\n".join(lines)
    return text + "\nAssistant:" if add_generation_prompt else text


def encode(tokenizer, text: str) -> list[int]:
    """Tokenise rendered prompt text without adding special tokens again.

    The chat template already wrote any BOS token, so adding it here would
    double it. Base models without a template get their BOS token here.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if not tokenizer.chat_template and bos is not None and (
            not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids = [bos] + ids
    return ids


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own special-token step prepends BOS.

    A GGUF tokenizer reloaded from the cache folder reports
    add_bos_token=False in transformers 5.25 although its post-processor
    still prepends BOS (gemma-3-270m), so the post-processor is asked too.
    """
    if getattr(tokenizer, "add_bos_token", False):
        return True
    return tokenizer.encode("", add_special_tokens=True)[:1] == [
        tokenizer.bos_token_id]


def stop_token_ids(tokenizer) -> list[int]:
    """Return the token ids that end a model turn."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    return sorted(ids)
