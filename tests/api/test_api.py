"""``import loft as higher``: the names higher code uses are there."""

from __future__ import annotations

import loft as higher


def test_top_level_names() -> None:
    for name in ("innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim",
                 "register_optim"):
        assert callable(getattr(higher, name)), name
    assert higher.optim.DifferentiableSGD and higher.optim.DifferentiableAdamW
    assert higher.patch.monkeypatch is higher.monkeypatch
    assert callable(higher.utils.get_func_params)
