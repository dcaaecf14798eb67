"""Finding a password, or any fragment of it, in what a program printed.

A fragment is any substring of 3 or more characters. A short fragment can also be ordinary
text (a password holding "URL" is "found" in every message naming PACKIT_BROKER_URL), so each
output is compared with the output for a *surrogate* password: the same password with every
character that no parser treats specially replaced by another of its class (digit by digit,
hex letter by hex letter, other letter by letter, punctuation by punctuation). The surrogate
takes exactly the same parsing path, so a fragment that is in the output for the password but
not in the output for its surrogate came from the password. Fragments made only of the
delimiters every parser must look at (`/?#@:%[]`, whitespace) cannot be told apart this way.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

#: What URL parsing looks at; kept as is in the surrogate.
DELIMITERS = frozenset("/?#@:%[]" + string.whitespace)
_EXTRA_LETTERS = "äöüßéñøłжя€"
_CLASSES = (
    string.digits,
    "abcdef",
    "ABCDEF",
    "ghijklmnopqrstuvwxyz",
    "GHIJKLMNOPQRSTUVWXYZ",
    "".join(ch for ch in string.punctuation if ch not in DELIMITERS),
    _EXTRA_LETTERS,
)
_SURROGATE = {ch: group[(i + 1) % len(group)] for group in _CLASSES for i, ch in enumerate(group)}

#: Every printable ASCII character (whitespace included) and a few non-ASCII ones, unencoded.
PRINTABLE = string.printable + _EXTRA_LETTERS


def passwords(min_size: int = 3, max_size: int = 24) -> st.SearchStrategy[str]:
    """Passwords of every printable character; delimiters often, so every parser path is hit."""
    delimiter_heavy = st.sampled_from(sorted(DELIMITERS - set(string.whitespace)))
    alphabet = st.one_of(st.sampled_from(PRINTABLE), delimiter_heavy)
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


def login_passwords(min_size: int = 3, max_size: int = 24) -> st.SearchStrategy[str]:
    """As `passwords`, half of them without / ? # or whitespace: they parse and reach a login."""
    breakers = set("/?#" + string.whitespace)
    parseable = st.text(
        alphabet=st.sampled_from([ch for ch in PRINTABLE if ch not in breakers]),
        min_size=min_size,
        max_size=max_size,
    )
    return st.one_of(passwords(min_size, max_size), parseable)


def surrogate(password: str) -> str:
    return "".join(_SURROGATE.get(ch, ch) for ch in password)


def fragments(password: str, length: int = 3) -> set[str]:
    return {
        password[i:j] for i in range(len(password)) for j in range(i + length, len(password) + 1)
    }


def leaked(password: str, output: str, reference: str) -> list[str]:
    """Fragments of `password` in `output` that are not in the surrogate's `reference`."""
    return sorted((f for f in fragments(password) if f in output and f not in reference), key=len)
