"""Print the settings page (docs/settings.md) generated from SPEConfig's field docstrings.

python scripts/settings_table.py > docs/settings.md
(tests/integration/test_docs.py fails when the committed page differs from what this prints.)
"""

from spe_lightning.config import settings_markdown

if __name__ == "__main__":
    print(settings_markdown(), end="")
