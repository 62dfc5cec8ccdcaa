"""The command layer: every command's `main`, above the library (nothing in fcmae below imports it).

    exits       how a command ends: one-line errors (exit 2), a preempted run (75), a clean process group
    convert     fcmae-convert (`python -m fcmae.convert`): conversions, and the exports of fcmae.exports
    visualize   `python -m fcmae.visualize`: reconstruction grids of a model file or run
    stats       fcmae-stats (`python -m fcmae.data.stats`): per-channel mean and std of a dataset
    shards      fcmae-shards: an image folder as webdataset tar shards

pretrain.py and finetune.py end through `run_cli` too, and answer `--help` and a bad flag through
`check_command_line` before torch and timm import.
"""

from .exits import check_command_line, debugging, end_process_group, print_error, run_cli, show_causes

__all__ = ["run_cli", "check_command_line", "print_error", "debugging", "show_causes", "end_process_group"]
