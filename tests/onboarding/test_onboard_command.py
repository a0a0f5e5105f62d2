"""`satroute onboard --config FILE MODEL`: the same onboarding from the command line, same state."""
from __future__ import annotations

import pytest

from proxy.cli import main
from proxy.store import Store
from support.mock_upstream import MockUpstream, answer

from onboarding.fakes import model_entry, tiny_suite_files, write_providers


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
    assert main(argv + ["--restart"]) == 0  # --restart forgets and asks everything again
    assert len(up.bodies("fresh")) == asked + 6


def test_onboard_command_errors(tmp_path, up, capsys):
    suite, data = tiny_suite_files(tmp_path)
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    base = ["--config", str(config), "--state-dir", str(tmp_path / "state"), "--suite", str(suite)]
    assert main(["onboard", "nope", *base, "--data", str(data)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    assert main(["onboard", "fresh", *base, "--data", str(tmp_path / "missing")]) == 2
    assert "no prompts.jsonl.gz" in capsys.readouterr().err
    assert main(["onboard", "fresh", *base, "--data", str(data), "--spend-cap", "0.0000001"]) == 1
    assert "exceeds the spend cap" in capsys.readouterr().out
