import pytest

from jaxlab.models.corpus import load_corpus


@pytest.fixture(scope="session")
def stdlib_corpus():
    """The default corpus (the Python stdlib's .py files), loaded once per session."""
    return load_corpus()
