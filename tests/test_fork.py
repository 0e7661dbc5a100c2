"""The fork test: the README's "Adding a method" example saved as prompts/vpt.py and one line added
to prompts.METHODS, on a copy of the repository, and nothing else edited. The whole suite is
collected; every test that runs per method (they read the methods from the registry, and each
method's facts from the model) must then pass for the new one too, and so must every test over the
whole registry at once (marked whole_registry: --help, the options' help, the README's table)."""
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COPIED = (".git", ".venv", "runs", "data_root", "__pycache__", ".pytest_cache", ".whl",
              ".device", "gpu_out", "toy_world.png")


def readme_example():
    """The first python block after the "## Adding a method" heading (as
    tests/test_registry.py reads it)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_method_plus_one_registry_line_passes_the_suite(tmp_path):
    fork = tmp_path / "fork"
    shutil.copytree(REPO, fork, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (fork / "prompts" / "vpt.py").write_text(readme_example())
    registry = fork / "prompts" / "__init__.py"
    before = registry.read_text()
    after = before.replace('    "pmpo",\n', '    "pmpo",\n    "vpt",\n', 1)  # the one line
    assert len(after.splitlines()) == len(before.splitlines()) + 1
    registry.write_text(after)
    env = {**os.environ, "CLIP_CACHE": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider",
                             "tests", "--ignore", "tests/test_fork.py", "-k",
                             "vpt or whole_registry"],
                            cwd=fork, env=env, capture_output=True, text=True, timeout=900)
    summary = (
        result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 10, summary  # the per-method tests ran for vpt, not just collected nothing
    assert "test_readme_table_has_every_method_above_zeroshot_on_base PASSED" in result.stdout
