"""Secrets out of recorded command lines: one set of rules and one marker for the model card and the recipes.

A command line ends up in results.json, the printed results table and the model card (which is
uploaded), so every value that may be a secret is replaced by `REDACTED`:

- the value of a flag whose name mentions a token, password, secret, key, auth(entication) or
  credential (`--hub_token X`, `--api-key=X`); flags about token counts or tokenizers
  (`--include_tokens_per_second`, `--tokenizer_name`) and `key_value` names (`--num_key_value_heads`)
  are not secrets;
- the value of an assignment to such a name (`HF_TOKEN=X python ...`, `push(token="X")`);
- anything shaped like a Hugging Face token (`hf_` followed by 16 or more letters and digits);
- the user and password of a URL (`https://user:pass@host/...` becomes `https://REDACTED@host/...`).

`redact_command` works on an argv list, `redact_secrets` on a command written as one string; both
apply the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["REDACTED", "is_secret_flag", "redact_command", "redact_secrets"]

REDACTED = "REDACTED"
_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "auth", "credential")
# "tokens"/"tokenizer" name token counts and tokenizers (--include_tokens_per_second, --tokenizer_name);
# "key_value" names attention heads (--num_key_value_heads), "author" a person; access tokens stay secret
_NOT_SECRET = re.compile(r"(?<!access[_-])token(?:s|izer)|key[_-]?value|author")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")
# the userinfo of a URL: `scheme://user[:password]@`
_URL_USERINFO = re.compile(r"(?<![\w+.-])([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@'\"]+@")
_VALUE = r"""('[^']*'|"[^"]*"|[^\s'"]+)"""
# `--name value` / `--name=value` inside a string; a value starting with `--` is the next flag
_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w.-]*)(=|[ \t]+(?!--))" + _VALUE)
# `NAME=value` (an environment variable, a keyword argument); not the `name=value` of a `--name=value` flag
_ASSIGNMENT = re.compile(r"(?<![\w-])([A-Za-z_]\w*)(\s*=\s*)" + r"""('[^']*'|"[^"]*"|[^\s'",)]+)""")


def is_secret_flag(option: str) -> bool:
    """Whether a flag (`--hub_token`, `--api-key`) or variable (`HF_TOKEN`) carries a secret: its name mentions
    a token, password, secret, key, auth(entication) or credential."""
    name = _NOT_SECRET.sub("", option.lstrip("-").lower())
    return any(word in name for word in _SECRET_WORDS)


def _hidden(value: str) -> str:
    """REDACTED in place of `value`, keeping its quotes."""
    quote = value[0] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else ""
    return f"{quote}{REDACTED}{quote}"


def _redact_fragments(text: str) -> str:
    """Secret assignments, URL credentials and token-shaped values of `text` redacted (the rules that need no
    flag context)."""
    text = _ASSIGNMENT.sub(lambda m: m[1] + m[2] + _hidden(m[3]) if is_secret_flag(m[1]) else m[0], text)
    text = _URL_USERINFO.sub(lambda m: f"{m[1]}{REDACTED}@", text)
    return _HF_TOKEN.sub(REDACTED, text)


def redact_command(argv: Sequence[str]) -> list[str]:
    """`argv` with the values of secret-bearing flags (`--flag value` and `--flag=value`) and secret
    assignments (`HF_TOKEN=...`) replaced by `REDACTED`, and anything shaped like a Hugging Face token
    (`hf_...`) too."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit():
            option, sep, _ = arg.partition("=")
            if is_secret_flag(option):
                if sep:
                    out.append(f"{option}={REDACTED}")
                    continue
                hide_next = True
        out.append(_redact_fragments(arg))
    return out


def redact_secrets(text: str) -> str:
    """`text` (a command line as one string) with the same secrets `redact_command` hides replaced by
    `REDACTED`; the rest of the text is kept as written."""
    text = _FLAG.sub(lambda m: m[1] + m[2] + _hidden(m[3]) if is_secret_flag(m[1]) else m[0], text)
    return _redact_fragments(text)
