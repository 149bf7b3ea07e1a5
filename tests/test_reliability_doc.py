"""docs/reliability.md lists every case of the reliability tests, with the counts per class and handling."""

from __future__ import annotations

import inspect
import re
from collections import Counter

from rlhf_lite.utils import REPO_ROOT
from tests import (
    test_reliability_data,
    test_reliability_faults,
    test_reliability_files,
    test_reliability_folders,
    test_reliability_resume,
    test_reliability_settings,
)
from tests.reliability import HANDLING

MODULES = (test_reliability_folders, test_reliability_resume, test_reliability_settings, test_reliability_data,
           test_reliability_faults, test_reliability_files)
CLASSES = ("folders", "resume", "settings", "data", "faults")


def all_cases() -> dict[str, str]:
    cases: dict[str, str] = {}
    for module in MODULES:
        assert not set(cases) & set(module.CASES), "a case id is used twice"
        cases.update(module.CASES)
    return cases


def test_every_case_has_its_test() -> None:
    for module in MODULES:
        source = inspect.getsource(module)
        for key, handling in module.CASES.items():
            assert handling in HANDLING and key.split("/")[0] in CLASSES, key
            slug = key.split("/", 1)[1]
            names = {slug, slug.removeprefix("kill-")}  # the kill points' ids are made in a loop
            assert any(f'"{n}"' in source or f"def test_{n.replace('-', '_')}" in source
                       or re.sub(r"-\d+-", "-{k}-", n) in source for n in names), f"{key}: no such test"


def test_doc_lists_every_case_with_the_counts() -> None:
    text = (REPO_ROOT / "docs" / "reliability.md").read_text()
    cases = all_cases()
    assert set(re.findall(rf"`((?:{'|'.join(CLASSES)})/[\w.-]+)`", text)) == set(cases)
    counts = Counter((key.split("/")[0], how) for key, how in cases.items())
    rows = {m[0]: [int(n) for n in m[1:]] for m in re.findall(r"^\| \d\. .*?`(\w+)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                                                               text, re.MULTILINE)}
    assert set(rows) == set(CLASSES)
    for cls, (total, *by_handling) in rows.items():
        assert by_handling == [counts[cls, how] for how in HANDLING] and total == sum(by_handling), cls
    total = re.search(r"^\| all \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", text, re.MULTILINE)
    assert [int(n) for n in total.groups()] == [len(cases), *[sum(counts[c, h] for c in CLASSES) for h in HANDLING]]
