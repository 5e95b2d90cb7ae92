"""The commands' --help names the defaults an operator of the host has to know; a missing
cluster is an error message, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.operator import cli
from bitbuilder.operator import main as operator_main


@pytest.mark.parametrize(
    ("argv", "defaults"),
    [
        (["run"], ["/run/bitbuilder/hostshim.sock", "/var/lib/bitbuilder/standalone", "main"]),
        (["get"], ["/var/lib/bitbuilder/standalone"]),
        (["webhook"], ["127.0.0.1:9292"]),
    ],
)
def test_bitbuilder_help_shows_defaults(
    argv: list[str], defaults: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for default in defaults:
        assert f"(default: {default})" in text


def test_operator_help_shows_the_socket(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        operator_main.build_parser().parse_args(["--help"])
    assert "(default: /run/bitbuilder/hostshim.sock)" in " ".join(capsys.readouterr().out.split())


def test_operator_without_a_cluster_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    assert operator_main.main(["--kubeconfig", str(empty)]) == 2
    assert "no cluster to talk to" in caplog.text and "--kubeconfig" in caplog.text


def test_webhook_without_a_cluster_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "kubeconfig").write_text("")
    (tmp_path / "secret").write_text("s3cret")
    argv = ["webhook", "--secret-file", str(tmp_path / "secret"), "--listen", "127.0.0.1:0"]
    assert cli.main([*argv, "--kubeconfig", str(tmp_path / "kubeconfig")]) == 2
    assert "no cluster to talk to" in caplog.text
