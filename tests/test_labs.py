"""The graded labs (labs/, see labs/README.md): nbgrader metadata, the committed student versions,
the Colab badges and install cells, and autograding end to end.

nbgrader always runs in a temporary copy of the course directory (labs/nbgrader_config.py plus
labs/source), never in labs/ itself, so the tests leave no files behind. Autograding executes
notebooks: each lab is graded five times (solution, untouched student version, two sets of
planted bugs, a tampered submission), in one module-scoped fixture per lab.
"""

from __future__ import annotations

import copy
import importlib
import csv
import re
import shlex
import shutil
import subprocess
import sys
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import yaml
from lab_bugs import Bug

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "labs"
LAB_IDS = sorted(p.name for p in (LABS / "source").iterdir() if p.is_dir() and not p.name.startswith("."))

SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")
HIDDEN_MARKERS = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


# --------------------------------------------------------------------------- notebooks


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def source_path(lab: str) -> Path:
    return LABS / "source" / lab / f"{lab}.ipynb"


def release_path(lab: str) -> Path:
    return LABS / "release" / lab / f"{lab}.ipynb"


def _nbgrader(cell: nbformat.NotebookNode) -> dict:
    return cell.metadata.get("nbgrader", {})


def _cell(nb: nbformat.NotebookNode, grade_id: str) -> nbformat.NotebookNode:
    found = [c for c in nb.cells if _nbgrader(c).get("grade_id") == grade_id]
    assert len(found) == 1, f"expected one cell with grade_id {grade_id!r}, found {len(found)}"
    return found[0]


def autograded_cells(nb: nbformat.NotebookNode) -> dict[str, float]:
    """{grade_id: points} of the autograder test cells (grade cells that are not answers)."""
    return {m["grade_id"]: m["points"] for c in nb.cells if (m := _nbgrader(c)).get("grade") and not m.get("solution")}


def written_cells(nb: nbformat.NotebookNode) -> dict[str, float]:
    """{grade_id: points} of the manually graded answers."""
    return {m["grade_id"]: m["points"] for c in nb.cells if (m := _nbgrader(c)).get("grade") and m.get("solution")}


def exercises(nb: nbformat.NotebookNode) -> list[str]:
    """The exercise numbers ("1", "2", ...) from the "## Exercise N" headings."""
    return [m.group(1) for c in nb.cells if c.cell_type == "markdown" for m in re.finditer(r"^## Exercise (\d+)", c.source, re.M)]


def _regions(text: str, markers: tuple[str, str]) -> list[str]:
    begin, end = (re.escape(m) for m in markers)
    return re.findall(rf"{begin}\n(.*?){end}", text, flags=re.S)


def secret_lines(nb: nbformat.NotebookNode) -> set[str]:
    """Lines of the solutions, hidden tests and model answers that appear nowhere else in the source."""
    secret, public = set(), set()
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if cell.cell_type == "markdown" and meta.get("solution"):
            secret.update(cell.source.splitlines())  # a whole model answer becomes "YOUR ANSWER HERE"
            continue
        hidden = _regions(cell.source, SOLUTION_MARKERS) + _regions(cell.source, HIDDEN_MARKERS)
        hidden_lines = {line for region in hidden for line in region.splitlines()}
        secret.update(hidden_lines)
        public.update(line for line in cell.source.splitlines() if line not in hidden_lines)
    strip = lambda lines: {line.strip() for line in lines if len(line.strip()) >= 8}  # noqa: E731
    return strip(secret) - strip(public)


def config_repository() -> tuple[str, str, str]:
    """(owner/name, https url, branch) from _config.yml's `repository` setting."""
    repo = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
    url, branch = repo["url"].rstrip("/"), repo["branch"]
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", url)
    assert match, f"_config.yml repository.url is not a GitHub repository: {url}"
    return match.group(1), url, branch


# --------------------------------------------------------------------------- static checks


def test_there_are_labs():
    assert {"lab01_quantization", "lab02_binary_ternary"} <= set(LAB_IDS)
    for lab in LAB_IDS:
        assert source_path(lab).is_file(), f"labs/source/{lab}/ must hold {lab}.ipynb"


@pytest.mark.parametrize("lab", LAB_IDS)
def test_source_is_a_valid_nbgrader_notebook(lab):
    from nbgrader.nbgraderformat import MetadataValidator

    nb = _read(source_path(lab))
    nbformat.validate(nb)
    MetadataValidator().validate_nb(nb)
    ids = [m["grade_id"] for c in nb.cells if (m := _nbgrader(c))]
    assert len(ids) == len(set(ids)), f"duplicate grade_id in {lab}"
    assert not [c.id for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)], \
        f"{lab}: clear the outputs before committing (the source is stored without outputs)"
    assert 3 <= len(exercises(nb)) <= 6, f"{lab}: 3 to 6 exercises, found {exercises(nb)}"
    assert written_cells(nb), f"{lab}: needs at least one manually graded written answer"
    tests = autograded_cells(nb)
    assert tests and all(points > 0 for points in tests.values())
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if cell.cell_type == "code" and meta.get("solution"):
            assert cell.source.count(SOLUTION_MARKERS[0]) == cell.source.count(SOLUTION_MARKERS[1]) >= 1, meta["grade_id"]
        if HIDDEN_MARKERS[0] in cell.source:
            assert meta.get("grade") and meta.get("locked"), f"hidden tests only in locked test cells: {meta}"
    # every exercise is autograded with visible tests and with hidden tests
    with_hidden = {_nbgrader(c)["grade_id"] for c in nb.cells if HIDDEN_MARKERS[0] in c.source}
    for n in exercises(nb):
        if f"ex{n}-answer" in written_cells(nb):
            continue
        assert f"ex{n}-tests" in tests and f"ex{n}-hidden" in with_hidden, f"{lab}: exercise {n}"


@pytest.mark.parametrize("kind", ["source", "release"])
@pytest.mark.parametrize("lab", LAB_IDS)
def test_colab_badge_and_install_cell_follow_config(lab, kind):
    owner_repo, url, branch = config_repository()
    path = source_path(lab) if kind == "source" else release_path(lab)
    nb = _read(path)
    badge = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/labs/release/{lab}/{lab}.ipynb"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and f"]({badge})" in first.source, f"{path.name}: badge must open {badge}"
    assert "colab-badge.svg" in first.source
    assert badge.split(f"/blob/{branch}/")[1] == release_path(lab).relative_to(ROOT).as_posix()
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert "try:\n    import labutils\nexcept ImportError:" in install.source
    assert f'%pip install -q "labutils @ git+{url}@{branch}"' in install.source
    assert _nbgrader(install).get("locked"), "the install cell is read-only"


# --------------------------------------------------------------------------- nbgrader in a temporary course


@dataclass
class Course:
    root: Path
    api: object  # nbgrader.apps.NbGraderAPI

    def generate(self, lab: str) -> nbformat.NotebookNode:
        result = self._call(self.api.generate_assignment, lab)
        assert result["success"], result.get("error") or result.get("log")
        return _read(self.root / "release" / lab / f"{lab}.ipynb")

    def autograde(self, lab: str, student: str, nb: nbformat.NotebookNode) -> dict[str, float]:
        """Submit ``nb`` as ``student``, autograde it and return {grade_id: score}."""
        from nbgrader.api import Gradebook

        folder = self.root / "submitted" / student / lab
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(folder / f"{lab}.ipynb"))
        result = self._call(self.api.autograde, lab, student)
        assert result["success"], result.get("error") or result.get("log")
        with _quiet(), Gradebook(self.api.coursedir.db_url) as gradebook:
            notebook = gradebook.find_submission_notebook(lab, lab, student)
            return {grade.name: float(grade.score) for grade in notebook.grades}

    def _call(self, method, *args):
        with _quiet():
            return method(*args)


@contextmanager
def _quiet():
    """nbgrader's SQLAlchemy session and the cells it re-adds (with no cell id) warn; neither matters here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_course(root: Path) -> Course:
    from nbgrader.apps import NbGraderAPI
    from traitlets.config.loader import PyFileConfigLoader

    root.mkdir(parents=True)
    shutil.copy(LABS / "nbgrader_config.py", root / "nbgrader_config.py")
    shutil.copytree(LABS / "source", root / "source")
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    assert Path(config.CourseDirectory.root) == root, "CourseDirectory.root must be the config's own folder"
    return Course(root=root, api=NbGraderAPI(config=config))


@pytest.fixture(scope="module", autouse=True)
def _one_thread_kernels():
    """The notebooks' kernels use one thread: their tensors are small, and on a busy CI machine
    torch's thread pool spends more time waiting for cores than computing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Course:
    pytest.importorskip("nbgrader")
    return make_course(tmp_path_factory.mktemp("labs") / "course")


@pytest.fixture(scope="module")
def released(course) -> dict[str, nbformat.NotebookNode]:
    return {lab: course.generate(lab) for lab in LAB_IDS}


@pytest.mark.parametrize("lab", LAB_IDS)
def test_committed_release_is_up_to_date(released, lab):
    fresh, committed = released[lab], _read(release_path(lab))
    assert fresh == committed, (
        f"labs/release/{lab} differs from a fresh student version: in labs/ run "
        f"`nbgrader generate_assignment {lab} --force` and commit labs/release/{lab}"
    )


@pytest.mark.parametrize("lab", LAB_IDS)
def test_student_version_has_no_solutions_or_hidden_tests(released, lab):
    source, student = _read(source_path(lab)), released[lab]
    text = "\n".join(c.source for c in student.cells)
    for marker in SOLUTION_MARKERS + HIDDEN_MARKERS:
        assert marker not in text
    student_lines = {line.strip() for line in text.splitlines()}
    secrets = secret_lines(source)
    assert len(secrets) > 20, "the secret-line check found (almost) nothing to look for"
    leaked = sorted(secrets & student_lines)
    assert not leaked, f"solution or hidden-test lines in the student version: {leaked[:5]}"
    assert [c.cell_type for c in student.cells] == [c.cell_type for c in source.cells]
    for grade_id in written_cells(source):
        assert _cell(student, grade_id).source == "YOUR ANSWER HERE"
    for cell in student.cells:
        if cell.cell_type == "code" and _nbgrader(cell).get("solution"):
            assert "raise NotImplementedError()" in cell.source


# --------------------------------------------------------------------------- planted bugs


def plant(nb: nbformat.NotebookNode, bugs: list[Bug]) -> nbformat.NotebookNode:
    nb = copy.deepcopy(nb)
    for bug in bugs:
        cell = _cell(nb, bug.cell)
        assert bug.old in cell.source, f"{bug.cell}: {bug.old!r} not in the solution any more; update the bug"
        cell.source = cell.source.replace(bug.old, bug.new, 1)
    return nb


def bugs(lab: str) -> tuple[list[Bug], list[Bug]]:
    """(visible, hidden) planted bugs of ``lab`` from ``tests/lab_bugs/<lab>.py``."""
    try:
        module = importlib.import_module(f"lab_bugs.{lab}")
    except ModuleNotFoundError:
        pytest.fail(f"plant bugs for {lab} in tests/lab_bugs/{lab}.py (VISIBLE and HIDDEN)")
    return module.VISIBLE, module.HIDDEN


def tamper(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What a student might try: edit a failing test, delete one, or strip its metadata and edit it."""
    nb = copy.deepcopy(nb)
    _cell(nb, "ex1-tests").source = "pass  # edited"
    _cell(nb, "ex1-hidden").source = "pass  # edited"
    nb.cells.remove(_cell(nb, "ex2-tests"))
    stripped = _cell(nb, "ex3-tests")
    stripped.metadata = {}
    stripped.source = "print('all good')"
    return nb


@pytest.fixture(scope="module", params=LAB_IDS)
def graded(request, course, released) -> tuple[str, dict[str, dict[str, float]]]:
    """{submission: {grade_id: score}} for one lab, from five autograded submissions."""
    lab = request.param
    visible, hidden = bugs(lab)
    solution = _read(source_path(lab))
    wrong_visible = plant(solution, visible)
    submissions = {
        "solution": solution,
        "blank": released[lab],
        "wrong-visible": wrong_visible,
        "wrong-hidden": plant(solution, hidden),
        "tampered": tamper(wrong_visible),
    }
    return lab, {student: course.autograde(lab, student, nb) for student, nb in submissions.items()}


def _autograded_total(lab: str, scores: dict[str, float]) -> float:
    return sum(scores[g] for g in autograded_cells(_read(source_path(lab))))


@pytest.mark.slow
@pytest.mark.notebooks
def test_autograde_solution_full_blank_zero(graded):
    lab, scores = graded
    tests = autograded_cells(_read(source_path(lab)))
    assert {g: scores["solution"][g] for g in tests} == tests, "the solution must get every autograded point"
    assert _autograded_total(lab, scores["blank"]) == 0
    # the untouched written answer is "YOUR ANSWER HERE": nbgrader scores it 0 without a human
    assert all(scores["blank"][g] == 0 for g in written_cells(_read(source_path(lab))))


@pytest.mark.slow
@pytest.mark.notebooks
def test_autograde_catches_every_planted_bug(graded):
    lab, scores = graded
    tests = autograded_cells(_read(source_path(lab)))
    visible, hidden = bugs(lab)
    for bug in visible:
        exercise = bug.cell.split("-")[0]
        assert scores["wrong-visible"][f"{exercise}-tests"] == 0, f"{lab}: visible tests miss {bug}"
    for bug in hidden:
        exercise = bug.cell.split("-")[0]
        assert scores["wrong-hidden"][f"{exercise}-tests"] == tests[f"{exercise}-tests"], \
            f"{lab}: {bug} should pass the visible tests (it demonstrates the hidden ones)"
        assert scores["wrong-hidden"][f"{exercise}-hidden"] == 0, f"{lab}: hidden tests miss {bug}"
    full = sum(tests.values())
    assert _autograded_total(lab, scores["wrong-visible"]) < full
    assert _autograded_total(lab, scores["wrong-hidden"]) < full


@pytest.mark.slow
@pytest.mark.notebooks
def test_editing_or_deleting_tests_gains_nothing(graded, course):
    lab, scores = graded
    assert scores["tampered"] == scores["wrong-visible"]
    graded_nb = _read(course.root / "autograded" / "tampered" / lab / f"{lab}.ipynb")
    original = _read(source_path(lab))
    for grade_id in ("ex1-tests", "ex2-tests", "ex3-tests"):
        assert _cell(graded_nb, grade_id).source.endswith(_cell(original, grade_id).source), grade_id


# --------------------------------------------------------------------------- the documented commands


def _readme_commands() -> list[str]:
    """The `nbgrader ...` lines of labs/README.md's workflow code blocks."""
    text = (LABS / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|console|shell)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("nbgrader ")]


@pytest.mark.slow
@pytest.mark.notebooks
def test_documented_workflow_runs_offline(tmp_path):
    """The instructor guide's commands, verbatim, for Lab 1 and two students (one zip)."""
    pytest.importorskip("nbgrader")
    lab = LAB_IDS[0]
    root = tmp_path / "course"
    root.mkdir()
    shutil.copy(LABS / "nbgrader_config.py", root)
    shutil.copytree(LABS / "source", root / "source")
    archive = root / "downloaded" / lab / "archive"
    (archive / "alice").mkdir(parents=True)
    shutil.copy(source_path(lab), archive / "alice" / f"Copy of {lab}.ipynb")
    with zipfile.ZipFile(archive / "bob.zip", "w") as zf:
        zf.write(release_path(lab), f"{lab} (1).ipynb")

    documented = _readme_commands()
    steps = [
        f"nbgrader generate_assignment {lab} --force",
        f"nbgrader zip_collect {lab}",
        f"nbgrader autograde {lab}",
        f"nbgrader generate_feedback {lab}",
        "nbgrader export",
    ]
    for step in steps:
        generic = step.replace(lab, "LAB")
        assert step in documented or generic in documented, f"labs/README.md must document `{generic}`"
        argv = [sys.executable, "-m", "nbgrader", *shlex.split(step)[1:]]
        run = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{step} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    for student in ("alice", "bob"):
        assert (root / "submitted" / student / lab / f"{lab}.ipynb").is_file()
        assert (root / "feedback" / student / lab / f"{lab}.html").is_file()
    with open(root / "grades.csv", newline="") as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh)}
    solution = _read(source_path(lab))
    autograded_points = sum(autograded_cells(solution).values())
    assert float(rows["alice"]["raw_score"]) == autograded_points
    assert float(rows["bob"]["raw_score"]) == 0
    assert float(rows["alice"]["max_score"]) == autograded_points + sum(written_cells(solution).values())
    assert (root / "gradebook.db").is_file()
    # the repository's labs/ stays untouched
    assert not (LABS / "submitted").exists() and not (LABS / "gradebook.db").exists()
