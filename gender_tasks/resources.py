"""The package's data files (the expectation suite, the report template, the study's Table 1).

They live in the project's top-level `include/` folder, which the package carries as
`gender_tasks/include` (a link in the checkout, a copy in a built wheel), so they are found
through the package itself, however it was installed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def include_path(*parts: str) -> Path:
    """The path of a file under include/, e.g. include_path("report.html.j2")."""
    return Path(str(files("gender_tasks").joinpath("include", *parts)))
