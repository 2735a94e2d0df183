"""The public API: every exported name is documented with a runnable example."""

from __future__ import annotations

import doctest

import pytest

import gradchain
import gradchain.schedules
import gradchain.tree


def _public() -> list[tuple[str, object]]:
    names = [(n, getattr(gradchain, n)) for n in gradchain.__all__]
    return names


@pytest.mark.parametrize("name,obj", _public(), ids=[n for n, _ in _public()])
def test_every_public_name_has_a_docstring_with_an_example(name: str, obj: object) -> None:
    doc = getattr(obj, "__doc__", None) or ""
    assert doc.strip(), f"gradchain.{name} has no docstring"
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples, f"gradchain.{name}'s docstring has no runnable example (>>> lines)"


def test_all_lists_exactly_the_exported_names() -> None:
    for name in gradchain.__all__:
        assert hasattr(gradchain, name), name
    assert len(set(gradchain.__all__)) == len(gradchain.__all__)
