"""Rewrite the two flag tables of docs/configuration.md with the generated ones (`python -m fcmae.config` prints them).

    python scripts/update_flag_tables.py

A table is found by its `--[no-]allow-resume-change` row, which both scripts have; the first is pretrain.py's, the
second finetune.py's. tests/test_cli.py checks that the page holds the generated tables.
"""

from pathlib import Path

from fcmae.config.command_line import flag_table
from fcmae.config.training_configs import FinetuneConfig, PretrainConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def table_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) line indices of each Markdown table that has the `--[no-]allow-resume-change` row."""
    spans, i = [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if j > i and any(line.startswith("| `--[no-]allow-resume-change`") for line in lines[i:j]):
            spans.append((i, j))
        i = max(j, i + 1)
    return spans


def main() -> None:
    lines = PAGE.read_text().splitlines()
    spans = table_spans(lines)
    if len(spans) != 2:
        raise SystemExit(f"error: expected 2 flag tables in {PAGE}, found {len(spans)}")
    for (start, end), cls in reversed(list(zip(spans, (PretrainConfig, FinetuneConfig)))):
        lines[start:end] = flag_table(cls).splitlines()
    PAGE.write_text("\n".join(lines) + "\n")
    print(f"updated {PAGE}")


if __name__ == "__main__":
    main()
