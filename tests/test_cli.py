"""Command line: info and demo."""

from diffusers_attn_ext.__main__ import main
from diffusers_attn_ext.demo import DEMOS


def test_info_prints_kernels(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flex" in out and "xformers" in out and "diffusers_active_backend" in out


def test_demo_writes_every_entry_of_a_family(tmp_path):
    assert main(["demo", "--output", str(tmp_path), "--family", "sd3"]) == 0
    summary = (tmp_path / "summary.md").read_text().splitlines()
    entries = [entry for entry in DEMOS if entry.family == "sd3"]
    assert len(summary) == 2 + len(entries)
    assert "| stock (StockAttnProcessor) | sd3 |" in summary[2] and summary[2].split("|")[4].strip() == "0"
    for row in summary[2:]:
        assert (tmp_path / row.split("|")[5].strip()).exists()
