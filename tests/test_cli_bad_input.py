"""Bad input, as a new user types it: one ``error:`` line naming the input, exit 1 or 2, no
traceback, and the catalog untouched. Also: SQL over the catalog stays inside the catalog while
every query the README and docs show keeps running."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from flows.cli import main

NOT_UTF8 = b'{"name": "caf\xe9"}\n'


@pytest.fixture
def demo_catalog(awm_home):
    """The demo environments published, plus reference rollouts of one of them."""
    from awm_core.settings import get_settings
    from awm_core.train.demo import demo_environments
    from flows.evaluate import EvalConfig, run_evaluation
    from storage.catalog import Catalog

    settings = get_settings()
    with Catalog.open(settings) as cat:
        with cat.publish(message="demo environments") as pub:
            pub.add_environments(demo_environments())
    run_evaluation(EvalConfig(split="all", env_ids=["recipe_box"], max_tasks_per_env=2), settings=settings)
    return awm_home


def snapshots() -> list[int]:
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        return [s["snapshot_id"] for s in cat.snapshots()]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def bad_inputs(tmp):
    (tmp / "latin1.jsonl").write_bytes(NOT_UTF8)
    (tmp / "awm1k").mkdir()
    (tmp / "awm1k" / "gen_scenario.jsonl").write_bytes(NOT_UTF8)
    (tmp / "bad.json").write_text('{"model": ')
    (tmp / "latin1.json").write_bytes(NOT_UTF8)
    (tmp / "folder.json").mkdir()
    return [
        # (argv, what the error line must name)
        (["generate", "-n", "0"], "-n/--scenarios"),
        (["generate", "-k", "-1"], "-k/--tasks-per-scenario"),
        (["generate", "-c", "many"], "-c/--concurrency"),
        (["generate", "--budget-usd", "0"], "--budget-usd"),
        (["generate", "--seed-list", str(tmp / "missing.json")], "missing.json"),
        (["generate", "--seed-list", str(tmp / "latin1.json")], "not UTF-8"),
        (["eval", "--episodes-per-task", "0"], "--episodes-per-task"),
        (["eval", "--snapshot", "-1"], "--snapshot"),
        (["eval", "--env", "no_such_env"], "no_such_env"),
        (["eval", "splits", "--ratio", "1.5"], "--ratio"),
        (["gate", "--snapshot", "999"], "snapshot 999"),
        (["catalog", "sql", "SELECT * FROM no_such_table"], "no_such_table"),
        (["catalog", "sql", "SELECT 1", "--snapshot", "999"], "snapshot 999"),
        (["env", "tools", "no_such_env"], "no_such_env"),
        (["env", "tools", str(tmp / "folder.json")], "is a folder"),
        (["env", "tools", str(tmp / "bad.json")], "bad.json"),
        (["env", "call", "recipe_box", "list_recipes", "{not json"], "JSON-ARGS"),
        (["env", "call", "recipe_box", "list_recipes", "[1]"], "JSON-ARGS"),
        (["env", "serve", "recipe_box", "--transport", "http", "--port", "70000"], "--port"),
        (["import", "awm1k", str(tmp / "missing")], "missing"),
        (["import", "awm1k", str(tmp / "awm1k")], "not UTF-8"),
        (["import", "bfcl", "--categories", "base,no_such"], "no_such"),
        (["import", "bfcl", "--wheel", str(tmp / "missing.whl")], "missing.whl"),
        (["import", "bfcl", "--wheel", str(tmp / "bad.json")], "not a wheel"),
        (["import", "bfcl", "--limit", "0"], "--limit"),
        (["eval", "--benchmark", "mmlu"], "unknown benchmark 'mmlu'"),
        (["train", "--set", "split=bfcl:nope"], "nope"),
        (["train", "--split", "bfcl:nope"], "nope"),
        (["train", "--config", str(tmp / "missing.toml")], "missing.toml"),
        (["train", "--config", str(tmp / "bad.json")], "bad.json"),
        (["train", "--config", str(tmp / "latin1.json")], "not UTF-8"),
        (["train", "--snapshot", "x"], "--snapshot"),
        (["llm", "serve-fixtures", "--fault-rate", "2"], "--fault-rate"),
    ]


def test_every_command_refuses_bad_input_with_one_line(demo_catalog, tmp_path, capsys, prefect_server):
    before = snapshots()
    failures = []
    for argv, names in bad_inputs(tmp_path):
        code, text = run_cli(argv, capsys)
        lines = [line for line in text.splitlines() if "error:" in line or line.startswith("skipped")]
        ok = (code in (1, 2) and "Traceback" not in text and any(names in line for line in lines))
        if not ok:
            failures.append(f"awm {' '.join(argv)} -> exit {code}:\n{text[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshots() == before  # nothing half-written landed


def test_bad_settings_name_the_setting_and_where_it_came_from(awm_home, monkeypatch, capsys):
    monkeypatch.setenv("AWM_SANDBOX__WORKERS", "-3")
    from awm_core.settings import get_settings

    get_settings.cache_clear()
    code, text = run_cli(["env", "tools", "recipe_box"], capsys)
    assert code == 1 and "Traceback" not in text
    assert "sandbox.workers" in text and "AWM_SANDBOX__WORKERS" in text and "greater than or equal to 1" in text


REFUSED = [
    "COPY (SELECT 1) TO '{tmp}/out.csv'",
    "COPY (SELECT 1) TO '{home}/catalog/data/planted.csv'",  # even inside the catalog's own folder
    "SELECT * FROM read_csv('/etc/passwd')",
    "ATTACH '{tmp}/other.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "PRAGMA enable_profiling",
    "CREATE TABLE planted AS SELECT 1",
    "SELECT 1; COPY (SELECT 1) TO '{tmp}/second.csv'",
]


def test_catalog_sql_is_confined_to_the_catalog(demo_catalog, tmp_path, capsys):
    for query in REFUSED:
        q = query.format(tmp=tmp_path, home=demo_catalog)
        code, text = run_cli(["catalog", "sql", q], capsys)
        assert code == 1 and "refused" in text and "Traceback" not in text, (q, text)
    assert not list(tmp_path.glob("*.csv")) and not list((demo_catalog / "catalog" / "data").glob("planted*"))


def documented_queries() -> list[list[str]]:
    """Every ``awm catalog sql "..."`` the README and docs show, with its options."""
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r'awm catalog sql "([^"]+)"((?:[ \t]+--[\w-]+(?:[ \t]+[\w]+)?)*)', text):
            query, opts = " ".join(m.group(1).split()), m.group(2).split()
            if query.strip(". ") == "" or "<" in query:
                continue  # placeholders ("...", "<query>")
            out.append([query, *opts])
        # the README's table of example queries, one per catalog table
        out += [[m.group(1)] for m in re.finditer(r"\| `((?:SELECT|WITH|FROM) [^`]+)` \|", text)]
    return out


def test_documented_queries_still_run(demo_catalog, capsys):
    queries = documented_queries()
    assert len(queries) >= 20, queries
    for q in queries:
        argv = ["catalog", "sql", *q]
        if "--snapshot" in argv:  # the docs say "--snapshot 5": any existing snapshot will do
            argv[argv.index("--snapshot") + 1] = str(snapshots()[-1])
        code, text = run_cli(argv, capsys)
        assert code == 0, (argv, text)


@pytest.mark.slow
def test_expected_failures_print_no_traceback_or_prefect_noise(demo_catalog, prefect_server):
    """Through the real console script: a failed gate, a snapshot that is not there and nothing
    to evaluate each end in their verdict or one error line."""
    import os

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    for argv, expect in [(["gate", "--snapshot", "999"], "error: snapshot 999"),
                         (["eval", "--env", "recipe_box", "--split", "train", "--split-by", "task",
                           "--max-tasks-per-env", "1", "--policy", "openai"], "error:")]:
        out = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode == 1 and expect in text, text
        assert "Traceback" not in text and " | ERROR " not in text and " | INFO " not in text, text
