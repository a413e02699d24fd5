"""The demo CLI: usage errors for bad values (argparse exits 2 with a message), a tiny run."""

import pytest

from anchor_ext import demo


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "4k"], "--sizes: expected comma-separated positive token counts"),
    (["--sizes", "0"], "--sizes: expected comma-separated positive token counts"),
    (["--q-heads", "6", "--kv-heads", "4"], "--kv-heads 4 must divide --q-heads 6"),
    (["--repeats", "-1"], "--repeats: expected a positive integer, got -1"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert "(default: 12.0)" in capsys.readouterr().out


def test_tiny_cpu_run():
    rows = demo.main(["--device", "cpu", "--sizes", "512", "--q-heads", "2", "--kv-heads", "1",
                      "--head-dim", "64", "--quality-blocks", "2"])
    assert len(rows) == 1 and rows[0]["n"] == 512
    assert 0.0 <= rows[0]["recall"] <= 1.0 + 1e-6  # fp32 rounding of a full softmax
    assert rows[0]["auto_path"] == "dense"  # CPU, 512 tokens: below the CPU rule's length
