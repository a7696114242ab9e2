"""docs/errors.md is kept in step with the bad-input tables: every case of the tables
has its row, no row is left without a case, and each row's message holds the case's fragment."""

import pytest

from tests import errors_doc


def _tables():
    from tests import test_bad_inputs as api

    expected = {("api", c[0]): c[3] for c in api.API_CASES}
    expected.update({("tools", c[0]): c[3] for c in api.CLI_CASES})
    expected.update({("pretrain_nonfinite", "NaN in the images"): "the images held NaN",
                     ("pretrain_nonfinite", "NaN upsampler weights"): "JAFAR's output held NaN"})
    try:
        from tests import test_bad_inputs_bev as bev
    except pytest.skip.Exception:  # without nuscenes-devkit the BeV rows cannot be checked
        return expected, False
    expected.update({("bev", c[0]): c[3] for c in bev.CASES})
    expected.update({("bev_nonfinite", f"NaN in {where}"): f"first non-finite input: {where}."
                     for where in ("the images", "the backbone features", "the upsampled features", "the logits")})
    return expected, True


def test_errors_doc_matches_the_bad_input_tables():
    assert errors_doc.DOC.is_file(), "docs/errors.md is missing: run the command in tests/errors_doc.py"
    rows = errors_doc.parse(errors_doc.DOC.read_text())
    expected, with_bev = _tables()
    if not with_bev:
        rows = {k: v for k, v in rows.items() if not k[0].startswith("bev")}
    hint = " (rerun: python -m pytest -q tests/test_bad_inputs.py tests/test_bad_inputs_bev.py --write-errors-doc)"
    missing = sorted(set(expected) - set(rows))
    stale = sorted(set(rows) - set(expected))
    assert not missing, f"cases without a row in docs/errors.md: {missing}{hint}"
    assert not stale, f"rows of docs/errors.md without a case: {stale}{hint}"
    for key, fragment in expected.items():
        assert fragment in rows[key][1], f"{key}: {rows[key][1]!r} lacks {fragment!r}{hint}"


def test_render_and_parse_round_trip():
    rows = {("api", "a | b"): ("ValueError", "x | y."), ("bev", "c"): ("KeyError", "z.")}
    assert errors_doc.parse(errors_doc.render(rows)) == rows
    assert errors_doc.normalise("/tmp/pytest-of-root/pytest-3/test_x0/run/a.ckpt") == "<tmp>/run/a.ckpt"
