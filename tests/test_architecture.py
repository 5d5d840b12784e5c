"""The shape of the job path, held by reading the source (``ast``): short functions, typed boundaries.

The job path is a series' journey after receipt: assembly, routing, the job and its steps, the journal they
record in, and the inference they call, from receipt (``scp``, ``spool``) to delivery (``dispatch``, ``stow``),
and the workers of several processes (``worker``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The modules a received instance's header passes on its way from receipt to a job (receive → route → job):
#: their public functions take and give typed values, never a bare dict or Any.
TYPED_BOUNDARY = (
    "dicom_node/headers.py",
    "dicom_node/assembly.py",
    "dicom_node/routing.py",
    "dicom_node/service.py",
    "dicom_node/jobs.py",
    "dicom_node/steps.py",
    "dicom_node/journal.py",
    "dicom_node/celery_routing.py",
    "dicom_node/celery_app.py",
)
#: The modules of the job path whose every function must stay short.
JOB_PATH = (*TYPED_BOUNDARY, "dicom_node/config.py", "dicom_node/dashboard.py", "dicom_node/scp.py",
            "dicom_node/spool.py", "dicom_node/dispatch.py", "dicom_node/stow.py", "dicom_node/worker.py",
            "dicom_node/celery_worker.py", "inference/volume.py", "inference/pipeline.py", "inference/segmentation.py",
            "inference/volumetry.py",
            "inference/agreement.py", "inference/models.py")
#: Where a dict is the point: the typed records' JSON form in the journal's columns (read back typed at once),
#: and the outbox summary `status` and the metrics print (not on the receive → route → job path).
DICT_ALLOWED = {
    ("dicom_node/headers.py", "InstanceHeader.to_json"), ("dicom_node/headers.py", "InstanceHeader.from_json"),
    ("dicom_node/headers.py", "SeriesAttributes.to_json"), ("dicom_node/headers.py", "SeriesAttributes.from_json"),
    ("dicom_node/journal.py", "Journal.outbox_summary"),
}
MAX_LINES = 50


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method, nested ones too, with its qualified name."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
    return walk(tree, "")


def _tree(module: str) -> ast.Module:
    return ast.parse((REPO / module).read_text(encoding="utf-8"), filename=module)


@pytest.mark.parametrize("module", JOB_PATH)
def test_no_function_in_the_job_path_is_longer_than_50_lines(module: str) -> None:
    long = {name: f.end_lineno - f.lineno + 1 for name, f in _functions(_tree(module))
            if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_LINES}
    assert long == {}, f"{module}: functions over {MAX_LINES} lines (with decorators and docstring): {long}"


def _untyped(annotation: ast.expr | None) -> str | None:
    """Why an annotation lets an untyped value through (None when it does not)."""
    if annotation is None:
        return "no annotation"
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a quoted annotation
        annotation = ast.parse(annotation.value, mode="eval").body
    source = ast.unparse(annotation)
    names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(annotation) if isinstance(n, ast.Attribute)}
    if "Any" in names:
        return source
    if source in ("dict", "Dict", "Mapping", "MutableMapping", "list", "tuple", "Sequence"):
        return source  # a container that does not say what it holds
    return None


def _public(name: str) -> bool:
    parts = name.split(".")
    return all(not p.startswith("_") for p in parts) or (len(parts) == 2 and parts[1] == "__init__"
                                                          and not parts[0].startswith("_"))


def _boundary_problems(module: str) -> list[str]:
    problems = []
    for name, f in _functions(_tree(module)):
        if not _public(name) or (module, name) in DICT_ALLOWED or name.count(".") > 1:
            continue
        arguments = f.args.posonlyargs + f.args.args + f.args.kwonlyargs
        for argument in arguments:
            why = None if argument.arg in ("self", "cls") else _untyped(argument.annotation)
            if why:
                problems.append(f"{name}({argument.arg}: {why})")
        why = None if f.name == "__init__" else _untyped(f.returns)
        if why:
            problems.append(f"{name} -> {why}")
    return problems


@pytest.mark.parametrize("module", TYPED_BOUNDARY)
def test_no_untyped_value_crosses_the_receive_route_job_path(module: str) -> None:
    assert _boundary_problems(module) == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """Both checks find what they are for (a long function, an Any or a bare dict at a public boundary)."""
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_LINES))
    tree = ast.parse(f"def long() -> None:\n{body}\n")
    assert [(n, f.end_lineno - f.lineno + 1) for n, f in _functions(tree)] == [("long", MAX_LINES + 1)]
    sample = ast.parse("from typing import Any\n"
                       "def route(attrs: dict, trace: list[str]) -> Any: ...\n"
                       "class Runner:\n    def run(self, job: 'dict[str, Any]') -> None: ...\n"
                       "    def _private(self, x: dict) -> dict: ...\n")
    found = {name: [_untyped(a.annotation) for a in f.args.args if a.arg != "self"] + [_untyped(f.returns)]
             for name, f in _functions(sample) if _public(name)}
    assert found == {"route": ["dict", None, "Any"], "Runner.run": ["dict[str, Any]", None]}
