"""Writes docs/config_fields.md: the table of config fields, generated from their declarations.

  python scripts/write_config_table.py           # rewrite the page
  python scripts/write_config_table.py --check   # exit 1 if the committed page is stale

Rerun after adding or changing a field in resnet_jax/train/fields.py; tests/test_config.py
fails while the committed page differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from resnet_jax.train.fields import fields_table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config_fields.md"


def main(argv: list[str]) -> int:
    text = fields_table()
    if argv[1:] == ["--check"]:
        if PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text:
            return 0
        print(f"{PAGE} is stale: run python scripts/write_config_table.py", file=sys.stderr)
        return 1
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
