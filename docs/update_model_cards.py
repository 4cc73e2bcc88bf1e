"""Rewrite the generated weights part of every bundle's model card (``bundles/*/docs/README.md``) from the weights
registry; ``tests/bundles/test_model_cards.py`` fails while a card is out of date.

    .venv/bin/python docs/update_model_cards.py
"""

from pathlib import Path

from medfm.bundles import bundle_name
from medfm.catalog import with_current_weights_section

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    for card in sorted(REPO.glob("bundles/*/docs/README.md")):
        text = card.read_text(encoding="utf-8")
        updated = with_current_weights_section(text, bundle_name(card.parents[1]))
        if updated != text:
            card.write_text(updated, encoding="utf-8")
            print(f"updated {card.relative_to(REPO)}")
