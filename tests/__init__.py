"""loft's tests, one folder per part of the package; run from the repository root with
``python3 -m pytest -q tests``. The folders are packages, so a test module imports its
helpers relatively (``from ..conftest import DEVICES``)."""
