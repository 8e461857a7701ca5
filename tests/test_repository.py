"""The repository travels: a clone anywhere holds everything its tests and scripts read."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT

# Roots under which one machine keeps its own files (a user's home, a build farm's checkout,
# pytest's temporary folders). System paths a Debian machine always has (/usr/bin/chromium) are fine.
_MACHINE_ROOTS = ("work", "home", "root", "Users", "farm", "mnt", "tmp/pytest-of")
_ABSOLUTE = re.compile(r"(?:^|[^A-Za-z0-9_.~/-])/(?:" + "|".join(map(re.escape, _MACHINE_ROOTS)) + r")/[A-Za-z0-9_.-]")


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        path = REPO_ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary (gzip, parquet, images)
        yield name, data.decode("utf-8", errors="replace")


def test_no_tracked_file_holds_an_absolute_path_of_a_machine():
    hits = [
        f"{name}:{n}: {line.strip()[:100]}"
        for name, text in _tracked_text_files()
        for n, line in enumerate(text.splitlines(), start=1)
        if _ABSOLUTE.search(line)
    ]
    assert not hits, "absolute paths of one machine:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_is_for():
    assert _ABSOLUTE.search('HH = "' + "/wo" + 'rk/shared/data/x.jsonl.gz"')
    assert _ABSOLUTE.search("cd /ho" + "me/alice/dpo && make")
    assert not _ABSOLUTE.search('executable_path="/usr/bin/chromium"')
    assert not _ABSOLUTE.search("see docs/work/notes.md and https://example.org/home/x")
