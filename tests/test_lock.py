"""The lock file the README's install line takes: it pins every requirement within its range, and the checker CI
runs on it tells a locked environment from a drifted one."""

from __future__ import annotations

from packaging.requirements import Requirement
from packaging.version import Version

from helpers import REPO_ROOT
from check_lock import differences, locked, main, normal


def requirements() -> list[Requirement]:
    out = []
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in (REPO_ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(Requirement(line))
    return out


def test_the_lock_pins_every_requirement_within_its_range():
    pins = locked(str(REPO_ROOT / "requirements-lock.txt"))
    for req in requirements():
        if req.name == "torch":
            assert "torch" not in pins  # GPU nodes bring their CUDA build; CI pins the CPU wheel first
            continue
        assert normal(req.name) in pins, f"{req.name} is not in requirements-lock.txt: run tests/update_lock.sh"
        assert Version(pins[normal(req.name)]) in req.specifier, (req, pins[normal(req.name)])


def test_check_lock_names_each_package_not_at_its_locked_version(tmp_path, capsys):
    from importlib import metadata

    here = metadata.version("pytest")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"# a comment\nPyTest=={here}\nno_such-package==1.0\npackaging==0.0.1\n")
    assert locked(str(lock)) == {"pytest": here, "no-such-package": "1.0", "packaging": "0.0.1"}
    assert differences(locked(str(lock))) == ["no-such-package: locked 1.0, here not installed",
                                              f"packaging: locked 0.0.1, here {metadata.version('packaging')}"]
    assert main([str(lock), "--quiet"]) == 1 and capsys.readouterr().out == ""
    lock.write_text(f"pytest=={here}\n")
    assert main([str(lock)]) == 0 and "1 of 1 packages at their locked version" in capsys.readouterr().out
