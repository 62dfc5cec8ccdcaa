"""The generated command line: help from the field docs, both spellings, "did you mean", and no silent demo."""

import subprocess
import sys
from pathlib import Path

import pytest

from fcmae.config import ConfigError, FinetuneConfig, OneLineArgumentParser, PretrainConfig, parse_config
from fcmae.config.command_line import build_parser, flag_table, options

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"pretrain.py": (PretrainConfig, ROOT / "configs" / "demo.yaml"),
           "finetune.py": (FinetuneConfig, ROOT / "configs" / "finetune" / "demo.yaml")}


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_help_describes_every_flag_with_its_default(cls):
    text = " ".join(build_parser(cls, "").format_help().split())  # unwrapped
    flags = options(cls)
    assert len(flags) > 30
    for option in flags:
        assert option.doc, f"{option.flag} has no documentation: add a comment on its field's line"
        assert f"{option.flag}" in text and " ".join(option.doc.split()) in text, option.flag
    assert "--mask-ratio MASK_RATIO fraction of the patches removed from each image (default: 0.6)" in text or \
        cls is FinetuneConfig
    assert "--batch-size BATCH_SIZE images per process and step; auto: the largest that fits the device (default: " in text
    assert "--norm-pix-loss, --no-norm-pix-loss" in text or cls is FinetuneConfig


def test_every_flag_in_both_spellings():
    config = parse_config(PretrainConfig, ["--data_path", "x", "--mask_ratio=0.75", "--no_norm_pix_loss",
                                           "--input_size", "64", "--decoder-embed_dim", "32", "--model", "tiny"])
    assert config.data_path == "x" and config.model.mask_ratio == 0.75 and not config.model.norm_pix_loss
    assert config.img_size == (64, 64) and config.model.decoder_embed_dim == 32
    assert config.model.name == "convnextv2_tiny"
    assert parse_config(FinetuneConfig, ["--data_path", "x", "--layer_decay", "0.7"]).layer_decay == 0.7
    # the other CLIs' parsers too (fcmae-convert, fcmae.visualize), and values keep their underscores
    parser = OneLineArgumentParser()
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--out")
    args = parser.parse_args(["--num_images", "3", "--out=my_file.png"])
    assert args.num_images == 3 and args.out == "my_file.png"
    with pytest.raises(ConfigError, match="unknown flag --num-imagez in the command line; did you mean --num-images"):
        parser.parse_args(["--num_imagez", "3"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_settings_without_data_fail_saying_so_and_never_run_the_demo(script, tmp_path):
    """Defect 2: `pretrain.py --max-steps 5` ran the demo (configs/demo.yaml) with the flags on top of it."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, script, "--max-steps", "1", "--output-dir", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    demo = SCRIPTS[script][1].relative_to(ROOT)
    assert result.stderr == (f"error: no data given: pass --data-path FOLDER (or a --config file that sets "
                             f"data_path); with no arguments at all it runs the demo ({demo})\n")
    assert not out.exists() and result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_arguments_at_all_still_picks_the_demo(script):
    cls, demo = SCRIPTS[script]
    config = parse_config(cls, [], demo=demo)
    assert config.data_path.startswith(("demo", "digits:")) and config.output_dir.startswith("output/")
    assert config.explicit == frozenset()


def test_unknown_flag_is_one_line_with_did_you_mean():
    result = subprocess.run([sys.executable, "finetune.py", "--data_path", "x", "--layer-decy", "0.7"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == "error: unknown flag --layer-decy in the command line; did you mean --layer-decay?\n"


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_readme_flag_tables_are_the_generated_ones(cls):
    """docs/configuration.md's tables are `python -m fcmae.config`'s output: scripts/update_flag_tables.py regenerates
    them when a field changes."""
    assert flag_table(cls) in (ROOT / "docs" / "configuration.md").read_text()


def test_readme_offers_a_cpu_only_install_outside_the_quickstart():
    """Issue 24, item 19: PyPI's Linux torch wheel brings CUDA; a CPU-only line uses PyTorch's CPU index under the
    same constraints, and the Quickstart keeps its two blocks."""
    import re

    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert quickstart.count("```bash") == 2
    cpu_lines = [line.strip() for line in quickstart.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu_lines and all(not line.startswith("```") for line in cpu_lines)
    line = cpu_lines[0]
    assert "-c constraints.txt" in line and re.search(r"\btorch\b", line) and "torchvision" in line
    pinned = dict(l.split("==") for l in (ROOT / "constraints.txt").read_text().split() if "==" in l)
    from packaging.specifiers import SpecifierSet

    assert f"{pinned['torch']}+cpu" in SpecifierSet(f"=={pinned['torch']}")  # the CPU wheel meets the constraint
