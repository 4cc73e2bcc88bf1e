"""The five model cards share one skeleton, and their generated weights part is the registry's
(``docs/update_model_cards.py`` rewrites it)."""

import pytest

from medfm.bundles import bundle_name
from medfm.catalog import GENERATED_START, with_current_weights_section
from tests.conftest import BUNDLES

CARDS = sorted(BUNDLES.glob("*/docs/README.md"))
#: The model zoo's card sections, in order: every card has exactly these level-2 headings.
SKELETON = ["Overview", "Weights and licence", "Data", "Input contract", "Workflows", "Evidence and performance",
            "Limitations", "Citation", "Licence"]


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.parents[1].name)
def test_every_model_card_has_the_same_sections_in_the_same_order(card):
    lines, in_code = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("## "):
            lines.append(line[3:].strip())
    assert lines == SKELETON
    section = card.read_text(encoding="utf-8").split("\n## Weights and licence\n", 1)[1].split("\n## ", 1)[0]
    assert GENERATED_START in section, "the generated weights table belongs in 'Weights and licence'"


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.parents[1].name)
def test_the_weights_part_of_each_model_card_is_generated_from_the_registry(card):
    text = card.read_text(encoding="utf-8")
    assert text.count(GENERATED_START) == 1
    assert with_current_weights_section(text, bundle_name(card.parents[1])) == text, \
        "out of date: run .venv/bin/python docs/update_model_cards.py"


def test_a_changed_registry_fact_makes_the_card_out_of_date(monkeypatch):
    import dataclasses

    from medfm.weights import registry

    card = BUNDLES / "models_genesis_chest_ct" / "docs" / "README.md"
    entry = registry.REGISTRY["genesis_chest_ct"]
    monkeypatch.setitem(registry.REGISTRY, entry.name, dataclasses.replace(entry, size=entry.size + 1))
    assert with_current_weights_section(card.read_text(), "models_genesis_chest_ct") != card.read_text()
