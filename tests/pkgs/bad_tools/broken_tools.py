"""A tool module whose dependency is missing: a worker naming it must refuse to start."""

import keel_no_such_dependency  # noqa: F401
