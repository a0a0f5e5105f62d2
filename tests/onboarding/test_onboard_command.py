"""`satroute onboard --config FILE MODEL`: the same onboarding from the command line, same state."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.providers import DEFAULT_BASES
from proxy.store import GradedAnswer, Store
from support.mock_upstream import MockUpstream, answer

from onboarding.fakes import model_entry, tiny_suite_files, wait_for, write_providers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def up():
    with MockUpstream() as mock:
        yield mock


def test_onboard_command_stores_the_profile_and_resumes(tmp_path, up, capsys):
    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("So the answer is (B)."))  # right on task1 only
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    argv = ["onboard", "fresh", "--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--data", str(data), "--suite", str(suite), "--concurrency", "2"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "fresh: done; 6/6 questions, accuracy 50.0%" in out.out
    assert "onboarding fresh" in out.err  # the progress bar
    with Store(tmp_path / "state") as store:
        assert store.get("fresh") == {"task0": 0.0, "task1": 1.0}
    asked = len(up.bodies("fresh"))
    assert main(argv) == 0  # done already: nothing is asked again
    assert len(up.bodies("fresh")) == asked
    with Store(tmp_path / "state") as store:
        spent = store.spent("fresh")
    capsys.readouterr()
    assert main(argv + ["--restart"]) == 0  # --restart forgets and asks everything again
    assert len(up.bodies("fresh")) == asked + 6
    # the spend too, and it says so: what an admin does to start over past the cap
    assert (f"--restart: the stored answers and profile of fresh, and the ${spent:.2f} spent on its "
            "onboarding, were forgotten: the spend cap counts from $0 again") in capsys.readouterr().err
    with Store(tmp_path / "state") as store:
        assert store.spent("fresh") == pytest.approx(spent)  # the new run's alone


def test_onboard_command_errors(tmp_path, up, capsys):
    suite, data = tiny_suite_files(tmp_path)
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    base = ["--config", str(config), "--state-dir", str(tmp_path / "state"), "--suite", str(suite)]
    assert main(["onboard", "nope", *base, "--data", str(data)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    write_providers(config, [model_entry("fresh", up.url, tmp_path),
                             model_entry("profiled", up.url, tmp_path, profile=True)])
    assert main(["onboard", "profiled", *base, "--data", str(data)]) == 2  # its profile is in the file
    assert "has model_info.capability_profile (profiled.json)" in capsys.readouterr().err
    assert not up.bodies("profiled")
    assert main(["onboard", "fresh", *base, "--data", str(tmp_path / "missing")]) == 2
    assert "no prompts.jsonl.gz" in capsys.readouterr().err
    assert main(["onboard", "fresh", *base, "--data", str(data), "--spend-cap", "0.0000001"]) == 1
    assert "exceeds the spend cap" in capsys.readouterr().out


def test_onboard_command_asks_a_local_model_with_the_key_the_serving_proxy_kept(tmp_path, up, capsys):
    """A local_server model's server is the running proxy's and answers only with the key that
    proxy started it with, which it keeps in the state folder: the command reads it there."""
    from proxy.localserver import publish_key

    suite, data = tiny_suite_files(tmp_path)
    entry = model_entry("local", up.url, tmp_path)
    entry["model_info"]["local_server"] = {"model": "builtin:smollm2", "port": 28434}
    config = tmp_path / "providers.yaml"
    write_providers(config, [entry])
    argv = ["onboard", "local", "--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--data", str(data), "--suite", str(suite)]
    assert main(argv) == 2  # no proxy has run on this state: its server would refuse every question
    assert "start satroute serve with the same state directory" in capsys.readouterr().err
    assert not up.bodies("local")
    publish_key(tmp_path / "state", "the-serving-proxy-s-key")
    assert main(argv) == 0
    asked = {r.headers.get("authorization") for r in up.received}
    assert asked == {"Bearer the-serving-proxy-s-key"} and len(up.bodies("local")) == 6


def onboard_fresh(tmp_path, up) -> list[str]:
    """The command's arguments to onboard model `fresh` of a tiny suite on ``up``, which answers
    (B) to every question."""
    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("So the answer is (B)."))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    return ["onboard", "fresh", "--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--data", str(data), "--suite", str(suite)]


def test_onboard_command_leaves_a_model_another_process_onboards(tmp_path, up, capsys):
    """While another process (here: another store) holds the model's lease, the command asks and
    forgets nothing, says who holds it in one line, and exits 2; once released, it runs."""
    argv = onboard_fresh(tmp_path, up)
    with Store(tmp_path / "state") as other:
        other.begin("fresh", "tiny", 6)
        other.record("fresh", GradedAnswer("mmlu_pro/0", "A", True))
        for extra in ([], ["--restart"]):
            assert main(argv + extra) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1
            assert f"fresh is being onboarded by {other.owner}" in err
            assert other.answered("fresh") == {"mmlu_pro/0"}  # --restart forgot nothing
        assert not up.bodies("fresh")
        assert other.progress("fresh").status == "running"
        other.release("fresh")
        assert main(argv) == 0
        assert len(up.bodies("fresh")) == 5  # the stored answer is not asked again


def test_onboard_command_keeps_the_answers_of_the_upstream_a_running_proxy_points_at(tmp_path, up, capsys):
    """A proxy on the same state directory points the model at another upstream, on which its
    stored profile was measured: the command forgets and asks nothing, says so in one line, and
    exits 2; once that proxy no longer points there, it forgets and onboards."""
    argv = onboard_fresh(tmp_path, up)
    with Store(tmp_path / "state") as proxy:
        proxy.begin("fresh", "tiny", 6, upstream="elsewhere")
        proxy.record("fresh", GradedAnswer("mmlu_pro/0", "A", True), cost=0.5)
        proxy.finish("fresh", "tiny", {"task0": 0.5, "task1": 0.5})
        proxy.using({"fresh": ("elsewhere", None)})
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"another proxy on this state directory ({proxy.owner}) points fresh at another " \
               "upstream" in err and "point fresh at the same upstream in" in err
        assert not up.bodies("fresh") and proxy.get("fresh") == {"task0": 0.5, "task1": 0.5}
        proxy.using({})
        assert main(argv) == 0
        assert ("its stored answers and profile were forgotten; the $0.50 spent on it is kept, and "
                "counts against the spend cap") in capsys.readouterr().err
        assert len(up.bodies("fresh")) == 6 and proxy.spent("fresh") > 0.5


def test_onboard_command_resumes_a_run_an_earlier_version_fingerprinted(tmp_path, up, capsys):
    """Upgrading: the store holds the upstream's fingerprint in an earlier version's form (of
    litellm_params.model as written, here without its provider): the same upstream, so the
    answers stored are kept and only the others asked."""
    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("So the answer is (B)."))
    config = tmp_path / "providers.yaml"
    entry = model_entry("fresh", up.url, tmp_path)
    entry["litellm_params"]["model"] = "fresh"
    write_providers(config, [entry])
    with Store(tmp_path / "state") as store:
        store.begin("fresh", "tiny", 6,
                    upstream=hashlib.sha256(f"fresh\n{up.url}".encode()).hexdigest()[:16])
        store.record("fresh", GradedAnswer("mmlu_pro/0", "A", True))
        store.interrupted("fresh")
    assert main(["onboard", "fresh", "--config", str(config), "--state-dir", str(tmp_path / "state"),
                 "--data", str(data), "--suite", str(suite)]) == 0
    assert "another upstream" not in capsys.readouterr().err
    assert len(up.bodies("fresh")) == 5  # the stored answer is not asked again


def test_onboard_command_records_the_upstream_in_the_form_the_version_before_reads(tmp_path, up, monkeypatch):
    """A model on its provider's own api_base written out (the mock plays OpenAI's here): the
    store's ``upstream_plain`` holds the fingerprint the version before computed for it (provider,
    model and the base normalised), which that version, rolled back to, compares with its own;
    the form in which the base written out and left out are one upstream would be taken by it
    for the base left out, and the profile forgotten."""
    monkeypatch.setitem(DEFAULT_BASES, "openai", up.url)
    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("So the answer is (B)."))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url + "/", tmp_path)])
    assert main(["onboard", "fresh", "--config", str(config), "--state-dir", str(tmp_path / "state"),
                 "--data", str(data), "--suite", str(suite)]) == 0
    with Store(tmp_path / "state") as store:
        plain = store._read("SELECT upstream_plain FROM onboarding WHERE model = 'fresh'")[0][0]
    assert plain == hashlib.sha256(f"openai/fresh\n{up.url}".encode()).hexdigest()[:16]


def test_onboard_command_invalid_settings_and_state_are_one_line(tmp_path, up, capsys):
    suite, data = tiny_suite_files(tmp_path)
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    base = ["onboard", "fresh", "--config", str(config), "--data", str(data), "--suite", str(suite)]
    assert main(base + ["--state-dir", str(tmp_path / "state"), "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute onboard: invalid settings:") and "--concurrency: " in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "satroute.db").write_text("not a database, " * 100)
    for state in ("a-file", "bad"):
        assert main(base + ["--state-dir", str(tmp_path / state)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("satroute onboard: cannot open the state store in")
        assert len(err.strip().splitlines()) == 1
    assert not up.bodies("fresh")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_onboard_command_leaves_the_model_pending(tmp_path, up, signum):
    """Ctrl-C or SIGTERM: no traceback, one line saying how far it got, exit 128 + the signal,
    and the model stored as pending ("interrupted"), its lease released: the next run resumes."""
    suite, data = tiny_suite_files(tmp_path, per_task=10)
    up.set("fresh", answer("So the answer is (B).", delay=0.1))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "proxy.cli", "onboard", "fresh", "--config", str(config),
           "--state-dir", str(state), "--data", str(data), "--suite", str(suite),
           "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        db = state / "satroute.db"
        wait_for(lambda: _answers(db), lambda n: n >= 2, timeout=30)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: \d+/20 answers stored; run the same command to resume", last)
    with Store(state) as store:
        progress = store.progress("fresh")
        assert (progress.status, progress.reason) == ("pending", "interrupted")
        assert f"{progress.done}/20" in last and 2 <= progress.done < 20
        store.claim("fresh")  # released: another process may take it at once


SLOW_LOAD = """
import sys, time
import proxy.questions as q
load = q.load_questions
def slow(*args, **kwargs):
    open(sys.argv[1], "w").close()  # the load has begun
    time.sleep(20)  # a download of the questions from the hub
    return load(*args, **kwargs)
q.load_questions = slow
from proxy import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ctrl_c_while_the_questions_load_exits_at_once(tmp_path, up):
    suite, data = tiny_suite_files(tmp_path)
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    started = tmp_path / "loading"
    cmd = [sys.executable, "-c", SLOW_LOAD, str(started), "onboard", "fresh", "--config", str(config),
           "--state-dir", str(tmp_path / "state"), "--data", str(data), "--suite", str(suite)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        wait_for(lambda: started.exists(), bool, timeout=30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10  # not when the 20 s load ends
    assert err.strip().splitlines()[-1].startswith("interrupted: 0/")
    assert not up.bodies("fresh")


def _answers(db) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_a_finished_run_is_reported_as_such_on_a_stdout_that_is_not_utf8(tmp_path, up, monkeypatch):
    """Printing the summary about a model named in Chinese raised on an ASCII stdout
    (PYTHONIOENCODING=ascii, a Latin-1 locale): the stored run was reported as a configuration
    error, exit 2."""
    import io

    suite, data = tiny_suite_files(tmp_path)
    up.set("模型🚀", answer("So the answer is (B)."))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("模型🚀", up.url, tmp_path)])
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii", write_through=True))
    argv = ["onboard", "模型🚀", "--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--data", str(data), "--suite", str(suite), "--concurrency", "2"]
    assert main(argv) == 0
    assert "\\u6a21\\u578b\\U0001f680: done; 6/6 questions" in raw.getvalue().decode("ascii")
