"""Credentials out of sight: every URL nos prints or stores goes through `mask_url` or `mask_credentials`.

    mask_url("redis://:SECRET@127.0.0.1:6379/0")          -> "redis://:***@127.0.0.1:6379/0"
    mask_url("postgresql://u:SECRET@h/db?password=x")     -> "postgresql://u:***@h/db?password=***"
    mask_credentials("cannot reach amqp://u:pw@h/ now")   -> "cannot reach amqp://u:***@h/ now"

Masking works on the text, not on a parsed URL, so it also covers URLs that
do not parse (those are the ones error messages quote). The password is
whatever sits between the userinfo's first ':' and the last '@' before the
host; the host, port, path and user name stay readable. Text given to
`mask_url` is one URL even without a `scheme://` (`postgresql//u:pw@h`):
what lies between its first ':' and its last '@' is masked.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@  (the password may hold '@', ':' or '/' when unescaped; the last '@' wins)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:@/]*:)(?P<secret>[^\s]*?)(?P<at>@)"
                       r"(?=[^\s@]*(?:\s|$))")
# ?password=... or &password=... in a query string (libpq, redis-py and kombu all read it)
_QUERY = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|secret|token)=)(?P<secret>[^&;\s#]*)", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """`text` with the password of every URL in it (userinfo or query) replaced by ***."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK if m['secret'] else ''}{m['at']}", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK if m['secret'] else ''}", text)


def mask_url(url: object) -> str:
    """A URL (str or SQLAlchemy URL) as safe to print or store: its password shown as ***.

    Text given as a URL is masked even when it is not one (a mistyped `postgresql//u:pw@h/db`, with no
    `://` for mask_credentials to find): see _mask_userinfo.
    """
    if hasattr(url, "render_as_string"):
        return mask_credentials(url.render_as_string(hide_password=True))
    return _mask_userinfo(mask_credentials(str(url)))


def _mask_userinfo(text: str) -> str:
    """`text`, meant as one URL, with whatever sits between the first ':' after its scheme's '://' (or its
    start, without one) and its last '@' shown as ***: in a URL that is the password, and in text that only
    looks like one it is shown as *** too rather than risk showing a password."""
    at = text.rfind("@")
    if at < 0:
        return text
    scheme_end = text.find("://", 0, at)
    colon = text.find(":", scheme_end + 3 if scheme_end >= 0 else 0, at)
    if colon < 0 or text[colon + 1:at] in ("", MASK):
        return text
    return f"{text[:colon + 1]}{MASK}{text[at:]}"


__all__ = ["MASK", "mask_credentials", "mask_url"]
