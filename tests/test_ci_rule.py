"""The rule .ci/run relies on: in CI a missing tool or module fails its test, elsewhere it skips."""

import pytest

from tests.conftest import require_module, require_tool


@pytest.mark.parametrize("ci", ["true", "1", "yes", "TRUE"])
def test_a_missing_tool_fails_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-crystalc"):
        require_tool("no-such-tool-crystalc")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_crystalc"):
        require_module("no_such_module_crystalc")


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_tool_skips_elsewhere(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-crystalc"):
        require_tool("no-such-tool-crystalc")
    with pytest.raises(pytest.skip.Exception):
        require_module("no_such_module_crystalc")
    require_tool("sh")  # present: no skip, no failure
