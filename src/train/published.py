"""The published-checkpoint importer under its earlier path; it lives in src/run/published.py."""
from ..run.published import *  # noqa: F401,F403
from ..run.published import __all__  # noqa: F401
