"""The README's two set-up commands stay true: CI runs exactly its test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_gives_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    assert "experiments/main_job.py" in commands[0] and "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _setup_commands()[1].split("&&")[-1].strip()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert test_command in ci_lines
    assert ci_lines[-1] == test_command, "the test command must be CI's last step"


def test_main_job_script_exists():
    script = _setup_commands()[0].split("&&")[-1].split()[1]
    assert os.path.exists(os.path.join(ROOT, script)), script
