"""Tier 1: reading the inner run's junit XML, which is how the kernel tier tells passed from skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from vduproxy.testing.kernelvm.junit import JunitError, parse_junit

pytestmark = pytest.mark.unit

SAMPLE = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.kernel.inner.test_x" name="test_ok[/dev/vhost-vdpa-0]" time="0.1"/>
<testcase classname="tests.kernel.inner.test_x" name="test_bad[/dev/vhost-vdpa-0]" time="0.1">
  <failure message="AssertionError: 3 != 4">trace</failure></testcase>
<testcase classname="tests.kernel.inner.test_x" name="test_broken" time="0.1">
  <error message="fixture exploded">trace</error></testcase>
<testcase classname="tests.kernel.inner.test_x" name="test_skip" time="0.0">
  <skipped type="pytest.skip" message="no SUSPEND">reason</skipped></testcase>
</testsuite></testsuites>
"""


def test_each_outcome_is_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(SAMPLE)
    result = parse_junit(path)
    assert result.passed == ["tests.kernel.inner.test_x::test_ok[/dev/vhost-vdpa-0]"]
    assert result.failed == {
        "tests.kernel.inner.test_x::test_bad[/dev/vhost-vdpa-0]": "AssertionError: 3 != 4",
        "tests.kernel.inner.test_x::test_broken": "fixture exploded",
    }
    assert result.skipped == {"tests.kernel.inner.test_x::test_skip": "no SUSPEND"}
    assert result.summary() == "1 passed, 1 skipped, 2 failed"


@pytest.mark.parametrize("content", [None, "", "<testsuite><testcase"])
def test_missing_or_truncated_file_is_a_clear_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "junit.xml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(JunitError, match="cannot read junit xml"):
        parse_junit(path)
