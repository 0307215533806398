"""Read the junit XML an inner pytest run wrote in the guest: which tests passed, failed or were skipped.

The host side of the kernel tier judges the inner run by this, not by its exit status alone: a run that
skipped everything also exits 0.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path


class JunitError(Exception):
    """The file is missing or is not junit XML."""


@dataclasses.dataclass
class SuiteResult:
    passed: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> the failure's one-line message
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> reason

    def summary(self) -> str:
        return f"{len(self.passed)} passed, {len(self.skipped)} skipped, {len(self.failed)} failed"


def parse_junit(path: Path) -> SuiteResult:
    """Test ids are `classname::name`, e.g. `tests.kernel.inner.test_x::test_y[param]`."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise JunitError(f"cannot read junit xml {path}: {exc}") from exc
    result = SuiteResult()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            result.failed[test_id] = bad.get("message", "")
        elif (skip := case.find("skipped")) is not None:
            result.skipped[test_id] = skip.get("message", "")
        else:
            result.passed.append(test_id)
    return result
