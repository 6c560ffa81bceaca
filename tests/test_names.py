"""The one rule for client-given names (corpora, adapters, tuning runs, models)."""

import pytest

from icma.core.errors import InputError
from icma.core.names import check_name, is_name


@pytest.mark.parametrize("name", ["a", "chebi20", "my.corpus_2-b", "A" * 64])
def test_valid_names(name):
    assert is_name(name) and check_name(name, field="name") == name


@pytest.mark.parametrize("name", ["", "nl-test\n", "x\n", " x", "x ", ".hidden", "..", "../x",
                                  "a/b", "a\\b", "-x", "A" * 65, "é", "x\x00", None, 3, ["x"]])
def test_invalid_names_name_the_field_and_show_the_value(name):
    assert not is_name(name)
    with pytest.raises(InputError) as e:
        check_name(name, field="options.name", what="corpus name")
    assert e.value.field == "options.name" and e.value.status == 422
    if isinstance(name, str) and name:
        assert repr(name)[:20] in e.value.message or "..." in e.value.message
