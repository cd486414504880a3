# The install a user gets is the one CI tests: requirements.txt pins one torch, the README's Quick start installs
# that version's CPU build before anything else, .ci/run installs that same pin, and the tests run on it.
import os
import re
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def pinned_torch() -> str:
    pins = [line.split("#")[0].strip() for line in read("requirements.txt").splitlines() if re.match(r"torch\b", line)]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+(\.\d+)+", pins[0]), pins
    return pins[0].split("==")[1]


def quick_start() -> list[str]:
    section = read("README.md").split("## Quick start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_tests_run_on_the_pinned_torch():
    assert torch.__version__.split("+")[0] == pinned_torch()


def test_quick_start_installs_the_pinned_cpu_build_first_and_needs_no_sudo():
    lines = quick_start()
    assert lines[0] == f"pip install torch=={pinned_torch()} --index-url https://download.pytorch.org/whl/cpu"
    assert lines[1].startswith("pip install -r requirements.txt")
    assert not any("sudo" in line for line in lines)  # a root shell in a container has none


def test_ci_installs_the_pinned_torch_before_the_requirements():
    run = [line for line in read(".ci/run").splitlines() if "pip install" in line and not line.startswith("#")]
    # what its first pip line asks for, with pip replaced by echo
    asked = subprocess.run(["bash", "-c", run[0].replace("python -m pip install -q", "echo")], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert asked == [f"torch=={pinned_torch()}"]
    assert run[1].endswith("-r requirements-dev.txt") and "-r requirements.txt" in read("requirements-dev.txt")
