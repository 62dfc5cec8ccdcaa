"""python -m fcmae.config: the flag tables of docs/configuration.md, generated from the config dataclasses."""

from .command_line import flag_table
from .training_configs import FinetuneConfig, PretrainConfig

for config_class in (PretrainConfig, FinetuneConfig):
    print(f"{config_class.__name__}\n\n{flag_table(config_class)}\n")
