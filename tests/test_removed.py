"""Names nothing in loraplan uses any more: still there for a release from every module that exported them, with a
DeprecationWarning that points at the caller's line."""

from __future__ import annotations

import importlib
import warnings

import pytest

import loraplan.cost
import loraplan.cost.prediction
from loraplan._removed import removed


@pytest.mark.parametrize("old", ["loraplan.cost", "loraplan.cost.prediction"])
def test_fmt_ratio_is_deprecated_and_still_formats(old: str) -> None:
    module = importlib.import_module(old)
    assert "fmt_ratio" not in getattr(module, "__all__", [])
    with pytest.warns(DeprecationWarning, match=rf"^{old}\.fmt_ratio is deprecated: nothing in loraplan uses it"):
        fmt_ratio = module.fmt_ratio
    assert fmt_ratio is loraplan.cost.prediction._fmt_ratio
    assert fmt_ratio(0.5) == "0.50x" and fmt_ratio(float("nan")) == "—"


def test_the_warnings_point_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loraplan.cost.fmt_ratio  # noqa: B018 - the attribute access is the test
        loraplan.cost.select_within_budget  # noqa: B018 - the same module's moved name, through the same __getattr__
    assert [w.filename for w in caught] == [__file__, __file__]
    assert "has moved to loraplan.allocation.budget.select_within_budget" in str(caught[1].message)


def test_a_name_that_is_neither_removed_nor_moved_is_an_attribute_error() -> None:
    getattr_ = removed("somewhere", {"old": 1}, moved={"gone": "loraplan.cost"})
    with pytest.raises(AttributeError, match="module 'somewhere' has no attribute 'other'"):
        getattr_("other")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        loraplan.cost.nothing_here  # noqa: B018
