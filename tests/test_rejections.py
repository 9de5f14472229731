"""Rejection reasons: one table (dataprep.rejections) that the code, the summary and the README agree on."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from dataprep.rejections import REASONS

REPO = Path(__file__).resolve().parents[1]
_CODE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")


def _reason_codes_in_source() -> dict[str, str]:
    """Every reason code the package can put in a ``rejected`` entry, read from its source: the
    first argument of ``SampleError(...)``, the reason arguments of BIWI's text readers (their
    ``reason`` / ``missing_reason`` parameters), the tracking's ``problem``, and ``"reason": ...``
    in a rejected entry. Code -> where it was first seen."""
    found: dict[str, str] = {}

    def add(node, where):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _CODE.match(node.value):
            found.setdefault(node.value, where)

    for path in sorted((REPO / "dataprep").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        readers_with_reason = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                               and {"reason", "missing_reason"} & {a.arg for a in f.args.args}}
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name == "SampleError" and node.args:
                    add(node.args[0], where)
                elif name in readers_with_reason:
                    for arg in node.args:
                        add(arg, where)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "problem" for t in node.targets):
                add(node.value, where)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "reason":
                        add(value, where)
    return found


def test_every_reason_the_code_gives_is_declared_and_every_declared_one_is_given():
    found = _reason_codes_in_source()
    # the scan itself: it must see the readers', the box stage's and the pipeline's codes
    assert {"corrupt_depth", "missing_pose", "bad_calibration", "box_jump", "no_face", "unexpected_error",
            "angle_out_of_range", "corrupt_image", "missing_mat"} <= set(found)
    undeclared = {code: where for code, where in found.items() if code not in REASONS}
    assert not undeclared, f"reason codes missing from dataprep.rejections.REASONS: {undeclared}"
    assert not set(REASONS) - set(found), f"declared but never given: {sorted(set(REASONS) - set(found))}"
    for code, reason in REASONS.items():
        assert reason.meaning and reason.action, code


def test_the_readme_lists_every_reason_with_its_advice():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    text = text[text.index("**Rejection reasons.**"):]
    text = text[:text.index("\n\n", text.index("| reason |"))]
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| .* \| (.*) \|$", text, re.M))
    assert set(rows) == set(REASONS)
    for code, action in rows.items():
        assert action == REASONS[code].action, code

