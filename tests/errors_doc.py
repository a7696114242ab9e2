"""``docs/errors.md`` from the bad-input suite: the refused-input tables of
``tests/test_bad_inputs.py`` and ``tests/test_bad_inputs_bev.py`` record, as they run, the message
each case really got; ``python -m pytest -q tests/test_bad_inputs.py tests/test_bad_inputs_bev.py
--write-errors-doc`` writes them here as Markdown, and ``tests/test_errors_doc.py`` fails when the
document and the tables drift apart (a case missing, a stale row, a message without its fragment)."""

import re
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"

#: (section key, heading, where the rows come from); the order of the document
SECTIONS = [
    ("api", "The upsampler API (in-process)", "tests/test_bad_inputs.py API_CASES"),
    ("tools", "tools/pretrain_jafar.py and tools/eval_2d.py (their run functions, in-process)",
     "tests/test_bad_inputs.py CLI_CASES"),
    ("pretrain_nonfinite", "Pretraining: the first non-finite loss",
     "tests/test_bad_inputs.py test_pretraining_stops_at_the_first_non_finite_loss"),
    ("bev", "tools/train_bev.py, the BeV data set and the shared resume (in-process)",
     "tests/test_bad_inputs_bev.py CASES"),
    ("bev_nonfinite", "BeV training: the first non-finite loss",
     "tests/test_bad_inputs_bev.py test_non_finite_loss_stops_with_one_sentence"),
]

#: (section, case) -> (exception type name, message); filled by the tests as they run
RECORDED: Dict[Tuple[str, str], Tuple[str, str]] = {}

_TMP = re.compile(r"/tmp/(pytest-of-[^/\s']+/pytest-\d+/[^/\s']+|tmp\w+)")


def normalise(message: str) -> str:
    """A message with the test's temporary folders as ``<tmp>`` and the checkout as ``.``."""
    return _TMP.sub("<tmp>", message).replace(str(ROOT), ".")


def record(section: str, case: str, exc: BaseException) -> None:
    RECORDED[(section, case)] = (type(exc).__name__, normalise(str(exc.args[0]) if isinstance(exc, KeyError)
                                                               else str(exc)))


HEADER = """# Refused inputs and what each message says

Every row is a case of the bad-input suite and the sentence that case really gets, as recorded by
the last run of

    python -m pytest -q tests/test_bad_inputs.py tests/test_bad_inputs_bev.py --write-errors-doc

(``<tmp>`` stands for the test's temporary folder). `tests/test_errors_doc.py` fails when a case of
those tables is missing here, a row here has no case, or a message here no longer holds the case's
expected fragment: rerun the command above after changing a message. Each sentence is raised before
any work or allocation (the tool cases leave no run directory behind), except the non-finite
stops, which happen at the first non-finite training loss.

Handled as correct behaviour rather than refused (tests named in brackets): OneCycle at any step
count (`test_one_cycle_runs_at_every_step_count`); final weights saved at a step that is not a
multiple of `checkpoint_every` (`test_final_weights_saved_at_a_non_multiple_step`); `metrics.csv`
appended across resumes and the own `last.ckpt` accepted as upsampler weights
(`test_resumed_pretraining_keeps_csv_rows_and_the_last_ckpt_loads_as_weights`); files created
with the process umask (`test_atomic_path_gives_the_umask_mode`); numpy integers as an output size
(`test_numpy_integers_are_a_valid_output_size`); float64 computed by a float64 model
(`test_float64_runs_when_the_model_is_float64`); the synthetic set never silently replaced; the
finite-value check opt-in (`check_finite=True` or `JAFAR_CHECK_FINITE=1`,
`test_check_finite_is_off_by_default_and_switched_by_the_environment`).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Dict[Tuple[str, str], Tuple[str, str]]) -> str:
    out = [HEADER]
    for key, heading, source in SECTIONS:
        mine = [(case, v) for (sec, case), v in rows.items() if sec == key]
        if not mine:
            continue
        out += [f"\n## {heading}\n", f"From `{source}`.\n", "| case | exception | message |", "|---|---|---|"]
        out += [f"| {_cell(case)} | {exc} | {_cell(msg)} |" for case, (exc, msg) in mine]
    return "\n".join(out) + "\n"


def parse(text: str) -> Dict[Tuple[str, str], Tuple[str, str]]:
    """The rows of a rendered document, ``(section key, case) -> (exception, message)``."""
    by_heading = {heading: key for key, heading, _ in SECTIONS}
    rows: Dict[Tuple[str, str], Tuple[str, str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = by_heading.get(line[3:].strip())
            continue
        if section is None or not line.startswith("| ") or line.startswith("| case |"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3:
            rows[(section, cells[0])] = (cells[1], cells[2])
    return rows


def write(rows: Dict[Tuple[str, str], Tuple[str, str]], path: Path = DOC) -> List[str]:
    """Write ``rows`` into the document: each section they hold is replaced whole (in the order
    its cases ran), the document's other sections are kept; returns the sections written."""
    old = parse(path.read_text()) if path.is_file() else {}
    fresh = {sec for sec, _ in rows}
    merged = dict(rows)  # a section that ran is replaced whole, in the order its cases ran
    merged.update({k: v for k, v in old.items() if k[0] not in fresh})
    path.write_text(render(merged))
    return sorted({sec for sec, _ in rows})
