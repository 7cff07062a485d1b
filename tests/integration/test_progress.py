"""Issue 10: progress bars on stderr for prompt encoding and index builds; one switch hides them."""
from __future__ import annotations

from click.testing import CliRunner

from embedstore.cli.main import main
from embedstore.util.progress import progress_enabled


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_bars_follow_the_environment_and_the_flag(monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "always")
    assert progress_enabled() and not progress_enabled(False)
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "never")
    assert not progress_enabled()
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "auto")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert not progress_enabled()  # auto: no terminal, no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress_enabled()


def test_prompt_encoding_and_index_builds_show_progress(tmp_path, image_folder, tiny_open_clip_dir, monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_PROGRESS", "always")
    cache = str(tmp_path / "c")
    model = ["--model", f"local-dir:{tiny_open_clip_dir}", "--cache", cache]
    out = cli("prompts", *model, "--device", "cpu", *[f"prompt {i}" for i in range(70)])
    assert out.stdout.startswith("70 new prompts encoded")
    assert "prompts: 100%" in out.stderr and "70/70" in out.stderr
    quiet = cli("--no-progress", "prompts", *model, "--device", "cpu", "another prompt")
    assert quiet.stderr == ""
    cli("encode", str(image_folder), *model, "--device", "cpu", "--workers", "0", "--no-progress")
    built = cli("index", "build", "--dataset", "scenes", *model, "--kind", "ivf")
    assert "index IVF1,Flat: built" in built.stderr
    assert "built IVF1,Flat over 24 rows" in built.stdout
