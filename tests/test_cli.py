"""The `nova-embeddings` command: help of the command and of each subcommand, the deprecated scripts/ wrappers,
`tiny` -> `convert` -> `demo` end to end, and requirements*.txt in step with pyproject.toml.

Commands run as `python -m nova_embeddings ...` in a subprocess, so nothing depends on the console script
being installed; the wrappers run as `python scripts/<name>.py` from outside the repository, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nova_embeddings.cli import SUBCOMMANDS

REPO_ROOT = Path(__file__).resolve().parent.parent
WRAPPERS = {
    "convert_jina_v4.py": "convert", "make_tiny_checkpoint.py": "tiny", "demo.py": "demo",
    "train_adapter.py": "train", "evaluate_retrieval.py": "evaluate", "serve.py": "serve",
    "benchmark.py": "bench", "load_test.py": "load-test",
}


def run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run a Python command line; PYTHONPATH is cleared so only the checkout (or an install) provides the package."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def cli(*args: str) -> subprocess.CompletedProcess:
    return run("-m", "nova_embeddings", *args)


def test_help_lists_every_subcommand():
    done = cli("--help")
    assert done.returncode == 0, done.stderr
    for sub in SUBCOMMANDS:
        assert f"  {sub.name} " in done.stdout, f"{sub.name} missing from --help"


def test_help_aligns_the_subcommand_summaries_in_one_column():
    lines = cli("--help").stdout.split("subcommands:\n", 1)[1].splitlines()
    columns = {line.index(sub.summary) for sub in SUBCOMMANDS for line in lines if line.startswith(f"  {sub.name} ")}
    assert len(columns) == 1, lines


def test_unknown_subcommand_is_an_error_listing_the_valid_ones():
    done = cli("encode-everything")
    assert done.returncode == 2
    assert "invalid choice: 'encode-everything'" in done.stderr
    assert all(f"'{sub.name}'" in done.stderr for sub in SUBCOMMANDS)


@pytest.mark.parametrize("module", ["nova_embeddings.train", "nova_embeddings.evaluate"])
def test_help_states_each_default_at_most_once_and_never_none(module, monkeypatch):
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "200")
    text = importlib.import_module(module).build_parser().format_help()
    entries = re.split(r"\n(?=  -)", text)
    assert "(default: None)" not in text
    assert all(entry.count("default") <= 1 for entry in entries), [e for e in entries if e.count("default") > 1]


@pytest.mark.parametrize("name", [sub.name for sub in SUBCOMMANDS])
def test_each_subcommand_help_shows_its_own_flags(name):
    done = cli(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: nova-embeddings {name} "), done.stdout[:200]
    assert "--help" in done.stdout


def test_every_wrapper_is_known_and_runs_a_subcommand():
    assert sorted(path.name for path in (REPO_ROOT / "scripts").glob("*.py")) == sorted(WRAPPERS)
    assert set(WRAPPERS.values()) <= {sub.name for sub in SUBCOMMANDS}


@pytest.mark.parametrize("script", sorted(WRAPPERS))
def test_deprecated_wrapper_help_works_outside_the_repository(script, tmp_path):
    done = run(str(REPO_ROOT / "scripts" / script), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{script} is deprecated: use `nova-embeddings {WRAPPERS[script]}`" in done.stderr
    assert done.stdout.startswith(f"usage: {script} [deprecated] ")


def test_tiny_convert_demo_end_to_end(tmp_path):
    jina, nova = tmp_path / "jina", tmp_path / "nova"
    done = cli("tiny", "--out", str(jina))
    assert done.returncode == 0, done.stderr
    assert (jina / "config.json").is_file() and (jina / "adapters").is_dir()

    done = cli("convert", "--jina-dir", str(jina), "--out", str(nova))
    assert done.returncode == 0, done.stderr
    assert (nova / "config.json").is_file() and (nova / "modeling_nova_embeddings_v1.py").is_file()

    done = cli("demo", "--model", str(nova), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "adapters loaded: [" in done.stdout
    assert "single vectors: (5, " in done.stdout


def test_tiny_refuses_a_folder_that_holds_files(tmp_path):
    """`tiny --out .` in a checkout must not replace its config.json, chat_template.json and tokenizer files."""
    (tmp_path / "config.json").write_text('{"mine": true}')
    done = cli("tiny", "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and str(tmp_path) in done.stderr
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


def test_convert_failure_exits_1_with_the_message(tmp_path):
    done = cli("convert", "--jina-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a requirements file, without comments and `-r` includes."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-r")]


def test_requirements_files_mirror_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert requirement_lines(REPO_ROOT / "requirements.txt") == project["dependencies"]
    assert requirement_lines(REPO_ROOT / "requirements-server.txt") == extras["server"]
    assert requirement_lines(REPO_ROOT / "requirements-corpus.txt") == extras["corpus"]
    dev = [req for req in extras["dev"] if not req.startswith(project["name"])]
    assert requirement_lines(REPO_ROOT / "requirements-dev.txt") == dev
    assert project["scripts"]["nova-embeddings"] == "nova_embeddings.cli:main"
