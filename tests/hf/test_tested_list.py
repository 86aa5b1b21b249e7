"""The tested list is the tested list (issue 20, item 5): every model type ouroboros calls tested has a config in the
lossless test matrix (tests/conftest.py FAMILIES), so no architecture is called tested without a test behind it."""
from __future__ import annotations

import transformers
from conftest import FAMILIES
from ouroboros.hf.support import TESTED_MODEL_TYPES


def test_every_tested_model_type_has_a_family_in_the_matrix():
    matrix = {getattr(transformers, fam.config).model_type: name for name, fam in FAMILIES.items()}
    missing = sorted(TESTED_MODEL_TYPES - matrix.keys())
    assert not missing, f"TESTED_MODEL_TYPES lists {missing}, which no config in conftest.FAMILIES builds"
