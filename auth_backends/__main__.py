"""`python -m auth_backends --markdown`: the README's table of backends, from their declarations."""

from __future__ import annotations

import sys

from auth_backends import all_declared

HEADER = "| flag | `[[auth]] kind` | authenticator | settings in TOML |\n| --- | --- | --- | --- |"


def markdown() -> str:
    return "\n".join([HEADER, *(backend.markdown_row() for backend in all_declared())])


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m auth_backends --markdown", file=sys.stderr)
        return 2
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
