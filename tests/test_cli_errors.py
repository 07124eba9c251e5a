"""Every command given an ordinary mistake (a missing file, an unreachable address, a bad value)
prints one clear line and exits non-zero: never a traceback. In-process, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcdn.cli import build_parser, main

DEAD = "127.0.0.1:1"  # nothing listens there


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    text = tmp / "doc.txt"
    text.write_text("a document")
    binary = tmp / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    missing = str(tmp / "missing.txt")
    return [
        (["publish", "--origin", DEAD, missing], "cannot read FILE"),
        (["publish", "--origin", DEAD, str(binary)], "not UTF-8 text"),
        (["publish", "--origin", DEAD, str(text)], "UNAVAILABLE"),
        (["purge", "--origin", DEAD, "doc@x"], "DOCUMENT[@VERSION]"),
        (["purge", "--origin", DEAD, "doc"], "UNAVAILABLE"),
        (["fetch", "--edges", DEAD, "--doc", missing], "cannot read --doc"),
        (["fetch", "--edges", DEAD, "--document", "doc@x"], "the version after @ is a number"),
        (["fetch", "--edges", DEAD, "--document", "doc", "--grant", missing], "--grant and --agent-key go together"),
        (["fetch", "--edges", DEAD, "--document", "doc", "--grant", missing, "--agent-key", missing], "cannot read"),
        (["publish", "--origin", DEAD, "--price-per-load", "5", str(text)], "--pay-to"),
        (["publish", "--origin", DEAD, "--price-per-load", "5", "--pay-to", "p", "--asset", "U S", str(text)], "asset"),
        (
            ["keys", "grant", "--issuer-key", missing, "--agent-key", missing, "--agent", "a", "--cap", "1"],
            "--agent-key",
        ),
        (["keys", "revoke", "--origin", DEAD, "g1"], "--issuer-key"),
        (["ledger", "reconcile", "--db", str(tmp / "l.db"), "--edges", DEAD], "UNAVAILABLE"),
        (["edge", "--origin", DEAD, "--grant-issuers", missing], "--receipt-key and --receipts"),
        (["ask", "--edges", DEAD, "--doc", missing, "--question", "q"], "cannot read --doc"),
        (["edge", "--origin", DEAD, "--listen", "nonsense"], "not HOST:PORT"),
        (["origin", "--store", str(tmp / "s"), "--max-document-tokens", "0"], "max_document_tokens"),
        (["origin", "--store", str(tmp / "s"), "--frame-bytes", "4MiB"], "--frame-bytes"),
        (["origin", "--store", str(tmp / "s"), "--listen", "0.0.0.0:0"], "without --tokens: anyone who reaches it"),
        (["up", "--edges", "0"], "at least 1"),
        (["loadtest", "bench", "--lengths", "x"], "--lengths"),
        (["loadtest", "bench", "--repeats", "0"], "--repeats"),
        (["loadtest", "bench", "--frame-bytes", "0"], "--frame-bytes"),
        (["loadtest", "run", "--edges", DEAD, "--origin", DEAD, "--tokens", "a:b"], "MIN:MAX"),
        (["loadtest", "economics", "--from-run", missing], "--from-run"),
        (["loadtest", "economics", "--sweep", "weather"], "--sweep"),
    ]


def test_each_command_reports_a_mistake_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in _cases(tmp_path):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, code, err)
        assert "Traceback" not in err and "\n" not in err, (argv, err)
        assert err.startswith(f"kvcdn {argv[0]}: ") and says in err, (argv, err)


def test_an_unreachable_edge_is_a_row_of_the_stats_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--edges", DEAD]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and DEAD in out.out


@pytest.mark.parametrize("argv", [["edge", "--origin", DEAD, "--mem-bytes", "12XB"], ["nosuchcommand"]])
def test_a_malformed_flag_is_argparse_usage_and_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "Traceback" not in err


COMMANDS_THAT_CALL_A_NETWORK = [
    ["publish", "doc.txt"],
    ["purge", "doc"],
    ["fetch", "--doc", "doc.txt"],
    ["ask", "--doc", "doc.txt", "--question", "q"],
    ["stats"],
    ["loadtest", "run"],
]


@pytest.mark.parametrize("argv", COMMANDS_THAT_CALL_A_NETWORK, ids=lambda a: " ".join(a[:2]))
def test_every_command_that_calls_a_network_takes_what_kvcdn_up_exports(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The variables `kvcdn up` prints, read by one set of flags (kvcdn.flags.add_connection_flags):
    # the documented load test failed when `loadtest run` ignored KVCDN_TOKEN_FILE.
    exported = {
        "KVCDN_ORIGIN": "127.0.0.1:7000",
        "KVCDN_EDGES": "127.0.0.1:7080",
        "KVCDN_TOKEN_FILE": "/keys/publisher.token",
        "KVCDN_TRUST": "/keys/publisher.pub",
        "KVCDN_TLS_CERT": "/pki/client.pem",
        "KVCDN_TLS_KEY": "/pki/client.key",
        "KVCDN_TLS_CA": "/pki/ca.pem",
    }
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(argv)
    assert args.token_file == Path("/keys/publisher.token")
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (
        Path("/pki/client.pem"),
        Path("/pki/client.key"),
        Path("/pki/ca.pem"),
    )
    if hasattr(args, "origin"):
        assert args.origin == "127.0.0.1:7000"
    if argv[0] not in ("purge", "stats"):  # the commands that receive signed blocks or manifests
        assert args.trust == (Path("/keys/publisher.pub"),)


def test_a_server_reads_no_tls_files_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCDN_TLS_CA", "/pki/ca.pem")  # an agent's shell must not turn mTLS on for a server
    args = build_parser().parse_args(["edge", "--origin", "127.0.0.1:7000"])
    assert args.tls_ca is None
