"""The preset catalogue: ``seqrl presets`` lists every run preset and policy loss, and the
tables in docs/algorithms.md are its ``--markdown`` output."""

import re
from pathlib import Path

from typer.testing import CliRunner

import seqrl.config.layers as layers
from seqrl.cli import app
from seqrl.config import list_presets
from seqrl.core import POLICY_LOSS_DEFAULTS, POLICY_LOSS_NAMES, POLICY_LOSSES

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [name for name, _, _ in list_presets()]


def _presets_command(*args: str) -> str:
    result = CliRunner().invoke(app, ["presets", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _row(name: str, output: str) -> bool:
    return re.search(rf"^│ {re.escape(name)} +│", output, re.MULTILINE) is not None


def test_presets_command_lists_every_run_preset_and_policy_loss():
    output = _presets_command()
    missing = [name for name in [*PRESETS, *POLICY_LOSSES] if not _row(name, output)]
    assert not missing


def test_every_policy_loss_has_a_summary_and_a_paper():
    for name, preset in POLICY_LOSSES.items():
        assert preset.summary and preset.paper.startswith("arXiv "), name
    # the public views of the catalogue
    assert POLICY_LOSS_NAMES == tuple(POLICY_LOSSES)
    assert POLICY_LOSS_DEFAULTS == {name: p.defaults for name, p in POLICY_LOSSES.items()}


def test_the_docs_tables_are_the_markdown_output():
    doc = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    found = re.search(
        r"<!-- seqrl presets --markdown -->\n(.*?)\n<!-- /seqrl presets --markdown -->", doc, re.S
    )
    assert found, "docs/algorithms.md lost its presets section"
    assert found.group(1) == _presets_command("--markdown").rstrip("\n"), (
        "update docs/algorithms.md §12 with the output of `seqrl presets --markdown`"
    )


def test_the_readme_names_every_preset():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [name for name in PRESETS if f"`{name}`" not in readme] == []


def test_a_preset_without_about_lists_blank_and_the_command_still_runs(tmp_path, monkeypatch):
    (tmp_path / "default.yaml").write_text("about:\n  summary: demo\n  paper: arXiv 1\n")
    (tmp_path / "bare.yaml").write_text("seed: 1\n")
    monkeypatch.setattr(layers, "_presets_dir", lambda: tmp_path)
    assert list_presets() == [("default", "demo", "arXiv 1"), ("bare", "", "")]
    assert _row("bare", _presets_command())
