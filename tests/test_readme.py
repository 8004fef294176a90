"""The README's two commands are what CI runs, and every dependency is pinned."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def readme_commands():
    """The two commands of the README's first code block (comment lines skipped)."""
    block = re.search(r"```bash\n(.*?)```", read("README.md"), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    setup, tests = readme_commands()
    ci_lines = [line for line in read(".ci/run").splitlines() if line.startswith(("pip ", "python3 -m pytest"))]
    *installs, ci_tests = ci_lines
    assert ci_tests == tests
    for line in installs:
        assert line.replace(" -q", "") in setup, line


def pins(name):
    lines = [line.strip() for line in read(name).splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def test_every_dependency_is_pinned_and_constrained():
    requirements, constraints = pins("requirements.txt"), pins("constraints.txt")
    assert {"torch", "transformers", "peft", "numpy", "tqdm", "pytest"} <= set(requirements)
    for package, version in requirements.items():
        assert constraints[package] == version, package
