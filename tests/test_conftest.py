"""The test setup itself: each kind of CPU compiles into an inductor cache of its own (conftest.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _cache_dir(before: str = "pass", **env: str) -> str:
    """TORCHINDUCTOR_CACHE_DIR as tests/conftest.py leaves it in a fresh process with env set
    (after running `before`)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    code = f"import os, sys; {before}; import tests.conftest; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_inductor_cache_is_one_per_cpu_kind_unless_chosen(tmp_path):
    scalar = Path(_cache_dir(ATEN_CPU_CAPABILITY="default"))
    assert scalar.name.startswith("moe-adapter-tests-default-")
    # another capability, on a torch without the private helper naming its default folder (an
    # older torch on a lent GPU): a folder of its own, under a fallback parent
    avx2 = Path(_cache_dir("sys.modules['torch._inductor.runtime.cache_dir_utils'] = None", ATEN_CPU_CAPABILITY="avx2"))
    assert avx2.name.startswith("moe-adapter-tests-avx2-") and avx2.parent != scalar.parent
    assert _cache_dir(TORCHINDUCTOR_CACHE_DIR=str(tmp_path)) == str(tmp_path)  # the user's choice stands


def test_the_longest_files_lead_the_collection_and_xdist_keeps_that_order():
    """The files tests/conftest.py orders for pytest-xdist exist (a renamed file would silently
    drop out of the list), lead the collection in the listed order, the rest keep theirs, and
    xdist's reordering by test count is switched off."""
    from tests.conftest import LONGEST_FILES_FIRST, pytest_collection_modifyitems, pytest_configure

    missing = [path for path in LONGEST_FILES_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FILES_FIRST names missing files: {missing}"
    others = ["tests/a/test_x.py::test_1", "tests/b/test_y.py::test_2", "tests/a/test_x.py::test_3"]
    listed = [f"{path}::test_{i}" for i, path in enumerate(LONGEST_FILES_FIRST)]
    items = [SimpleNamespace(nodeid=n, keywords={}) for n in [others[0], *listed[::-1], *others[1:]]]
    pytest_collection_modifyitems(None, items)
    assert [item.nodeid for item in items] == [*listed, *others]
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True))
    pytest_configure(config)
    assert config.option.loadscopereorder is False


def test_the_runs_tests_share_and_each_tests_folder_leave_the_disk_when_they_pass(tmp_path, pytestconfig):
    """A module's shared folder (`module_tmp_path`) goes when its tests pass and stays, for a look,
    when one fails; a passing test's own `tmp_path` goes too (pyproject.toml's retention policy)."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text("from tests.conftest import module_tmp_path  # noqa: F401\n")
    body = (
        "def test_{name}(module_tmp_path):\n"
        "    (module_tmp_path / 'run').write_text('x')\n"
        "    print(f'FOLDER={{module_tmp_path}}')\n"
    )
    (project / "test_passes.py").write_text(body.format(name="a") + body.format(name="b"))
    (project / "test_fails.py").write_text(body.format(name="c") + "    assert False\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed, 2 passed" in proc.stdout, proc.stdout + proc.stderr
    folders = {Path(path) for path in re.findall(r"FOLDER=(/\S+)", proc.stdout)}
    kept = {folder.name: folder.is_dir() for folder in folders}
    assert kept == {"test_passes0": False, "test_fails0": True}, kept
