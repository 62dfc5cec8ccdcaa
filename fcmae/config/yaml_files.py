"""Config files: a YAML mapping in, the resolved config out (config.yaml beside a run's outputs).

`load_yaml` is the one reader of both: a --config file, and a run's or checkpoint's config.yaml (the scripts'
resume, `fcmae.load`, the exports' model cards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .training_configs import TrainConfig  # noqa: TC001 (the type of save_yaml's argument)

__all__ = ["load_yaml", "save_yaml"]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; ConfigError if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    """Write `config` as YAML, in the file layout `--config` reads (the model as a `model:` section)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
