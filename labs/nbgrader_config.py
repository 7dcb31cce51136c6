"""nbgrader configuration of the labs' course directory (this folder).

Run every nbgrader command from ``labs/`` (nbgrader reads ``nbgrader_config.py`` from the current
directory); the exact commands are in ``labs/README.md``. All paths below are relative to this
folder, so a copy of ``labs/`` (a temporary course in the tests, a teaching assistant's laptop)
is a complete course of its own.
"""

import os

c = get_config()  # noqa: F821 (injected by traitlets when it executes this file)

HERE = os.path.dirname(os.path.abspath(__file__))

c.CourseDirectory.course_id = "onebit-llm-lab-book"
c.CourseDirectory.root = HERE
# nbgrader's default layout, spelled out: only source/ and release/ are committed.
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
# The gradebook is one SQLite file beside this config (git-ignored).
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(HERE, "gradebook.db")

# Autograding executes each submission top to bottom. The labs take a few seconds on a laptop;
# the limits only stop a runaway cell (an endless loop) from blocking the whole class.
c.Execute.timeout = 300

# A test cell the student deleted (or stripped of its nbgrader metadata) is put back from the
# gradebook and run: deleting a failing test never earns its points.
c.OverwriteCells.add_missing_cells = True

# `nbgrader zip_collect LAB` (offline collection; see README.md): put each student's files in
# downloaded/LAB/archive/, one folder or one .zip per student, named by the student id, e.g.
#   downloaded/lab01_quantization/archive/alice/lab01_quantization.ipynb
#   downloaded/lab01_quantization/archive/bob.zip   (holding "Copy of lab01_quantization.ipynb")
# The student id is that folder (or zip) name; the notebook is recognised by its lab name, so
# Colab's "Copy of ..." prefix and a browser's " (1)" suffix do not matter.
c.FileNameCollectorPlugin.named_regexp = (
    r".*[/\\]extracted[/\\](?P<student_id>[A-Za-z0-9][A-Za-z0-9._@-]*)[/\\]"
    r"(?:.*[/\\])?(?:Copy of )?(?P<file_id>lab\d\d_[A-Za-z0-9_]+?)(?: ?\(\d+\))?\.ipynb$"
)
