"""The README's commands work as written: what they run is installed by what they install."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _commands():
    return re.findall(r"```bash\n(.*?)```", _read("README.md"), flags=re.S)


def test_the_test_command_is_what_ci_runs_and_needs_no_sudo():
    test_command = _commands()[1].strip()
    assert not test_command.startswith("sudo") and " sudo " not in test_command  # root shells have none
    ci_lines = [line for line in _read(".ci/run").splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_every_command_the_readme_runs_is_installed_by_requirements():
    requirements = {re.split(r"[<>=\[ ]", line)[0].lower() for line in _read("requirements.txt").splitlines()
                    if line and not line.startswith(("#", "-"))}
    for block in _commands():
        for line in block.splitlines():
            program = line.split()[0] if line.split() else ""
            if program in ("gunicorn",):
                assert program in requirements, f"the README runs {program}, which requirements.txt lacks"
