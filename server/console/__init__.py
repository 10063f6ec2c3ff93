"""The operators' web console at /admin/console: server-rendered pages, htmx for live parts.

Templates are Jinja2 (`templates/`); `static/` holds the stylesheet and htmx 2.0.11
(`htmx.min.js` from the npm package htmx.org, Zero-Clause BSD, see `htmx.LICENSE.txt`), so the
console needs no build step and loads nothing from another site. Every page works as a plain
form-and-link page; htmx adds polling (job progress, activity) and in-place updates.
"""

from server.console.session import ConsoleSession, ConsoleSessions

__all__ = ["ConsoleSession", "ConsoleSessions"]
