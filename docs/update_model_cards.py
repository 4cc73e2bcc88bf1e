"""Rewrite what the bundles restate from the weights registry: the generated weights part of every model
card (``bundles/*/docs/README.md``) and ``eval_metrics`` in every ``configs/metadata.json``;
``tests/bundles/test_model_cards.py`` and ``tests/bundles/test_facts.py`` fail while one is out of date.

    .venv/bin/python docs/update_model_cards.py
"""

from pathlib import Path

from medfm.bundles import bundle_name
from medfm.catalog import with_current_eval_metrics, with_current_weights_section

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    for bundle_dir in sorted(REPO.glob("bundles/*/")):
        for path, update in ((bundle_dir / "docs" / "README.md", with_current_weights_section),
                             (bundle_dir / "configs" / "metadata.json", with_current_eval_metrics)):
            text = path.read_text(encoding="utf-8")
            updated = update(text, bundle_name(bundle_dir))
            if updated != text:
                path.write_text(updated, encoding="utf-8")
                print(f"updated {path.relative_to(REPO)}")
