"""Griffe extension for the API reference: turn the reST bits of gradchain's docstrings
into Markdown that mkdocstrings renders.

The docstrings are Google style (``Args:``, ``Returns:``, ``Example:``) and are also read
by ``help()`` and doctest, so they keep their reST roles and directives. This extension
rewrites, on the copy mkdocs renders:

* ``:func:`x```, ``:class:`x```, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:`` into
  cross-references to the API pages when the target is documented there, else code;
* ``:math:`x``` into inline math, ``.. math::`` blocks into ``$$`` display math;
* ``.. code-block:: python`` blocks into fenced code blocks;
* ```text <url>`_`` links into Markdown links.

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# Modules that have an API page (docs/api/*.md); only their public members are linked.
DOCUMENTED_MODULES = {
    "gradchain.base",
    "gradchain.gating",
    "gradchain.combine",
    "gradchain.transforms",
    "gradchain.update",
    "gradchain.state",
    "gradchain.tree",
    "gradchain.clipping",
    "gradchain.gates",
    "gradchain.optim",
    "gradchain.optim.sgd",
    "gradchain.optim.adam",
    "gradchain.schedules",
    "gradchain.adapter",
    "gradchain.testing",
    "gradchain.testing.laws",
    "gradchain.testing.strategies",
}

_ROLE = re.compile(r":(func|class|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (math|code-block)::\s*(.*)$")


class RstToMarkdown(griffe.Extension):
    """Rewrite reST roles and directives in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    out = [obj]
    for member in obj.members.values():
        if member.is_alias:
            continue
        out.extend(_walk(member))  # type: ignore[arg-type]
    return out


def _lookup(name: str, context: griffe.Object, pkg: griffe.Module) -> griffe.Object | None:
    """Find ``name`` as Sphinx would: in the class, its module, the package, or dotted."""
    scopes: list[griffe.Object] = []
    node: griffe.Object | None = context
    while node is not None:
        scopes.append(node)
        node = node.parent  # type: ignore[assignment]
    scopes.append(pkg)
    first, _, rest = name.partition(".")
    if name.startswith(pkg.name + "."):
        scopes, first, rest = [pkg], name.split(".")[1], ".".join(name.split(".")[2:])
    for scope in scopes:
        if first in scope.members:
            target: Any = scope.members[first]
            try:
                for part in rest.split(".") if rest else []:
                    target = target.members[part]
                return target.final_target if target.is_alias else target
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
            except Exception:  # noqa: BLE001 - an unresolvable alias is just not linked
                return None
    return None


def _is_documented(obj: griffe.Object) -> bool:
    if obj.is_module:
        return obj.path in DOCUMENTED_MODULES
    if any(part.startswith("_") for part in obj.path.split(".")):
        return False
    module = obj.module.path
    if module not in DOCUMENTED_MODULES:
        return False
    parent = obj.parent
    if parent is not None and parent.is_class and not _is_documented(parent):
        return False
    return obj.docstring is not None


def _role(match: re.Match[str], context: griffe.Object, pkg: griffe.Module) -> str:
    tilde, name = match.group(2), match.group(3).strip()
    title = name.rsplit(".", 1)[-1] if tilde else name
    if match.group(1) in ("func", "meth"):
        title += "()" if not title.endswith(")") else ""
    target = _lookup(name.lstrip("."), context, pkg)
    if target is not None and _is_documented(target):
        return f"[`{title}`][{target.path}]"
    return f"`{title}`"


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
_MULTI_NAME = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s*(.*)$")


def _sections(lines: list[str]) -> list[str]:
    """``Example:`` -> ``Examples:`` (the section griffe knows), and Napoleon's multi-name
    arguments (``rtol, atol: ...``, possibly wrapped after a comma) -> one item per name."""
    out: list[str] = []
    in_args = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and not line.startswith(" "):
            in_args = bool(_ARGS_HEADER.match(line))
            if line.rstrip() == "Example:":
                line = "Examples:"
        if in_args:
            while line.rstrip().endswith(",") and i + 1 < len(lines):
                i += 1
                line = line.rstrip() + " " + lines[i].strip()
            m = _MULTI_NAME.match(line)
            if m:
                indent, names, desc = m.groups()
                out += [f"{indent}{name.strip()}: {desc}" for name in names.split(",")]
                i += 1
                continue
        out.append(line)
        i += 1
    return out


def convert(text: str, context: griffe.Object, pkg: griffe.Module) -> str:
    lines = _sections(text.splitlines())
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, kind, first = m.group(1), m.group(2), m.group(3)
        lang = first.strip() or "text"
        body: list[str] = [first] if first.strip() and kind == "math" else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        stripped = _dedent(body)
        if kind == "code-block":
            out += [f"{indent}```{lang}", *[indent + s for s in stripped], f"{indent}```", ""]
        else:
            # One $$ block per blank-line separated equation (a blank line ends a block).
            chunk: list[str] = []
            for s in [*stripped, ""]:
                if s.strip():
                    chunk.append(s)
                elif chunk:
                    out += [f"{indent}$$", *[indent + c for c in chunk], f"{indent}$$", ""]
                    chunk = []
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(lambda m: _role(m, context, pkg), text)
    return _LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", text)


def _dedent(lines: list[str]) -> list[str]:
    widths = [len(s) - len(s.lstrip()) for s in lines if s.strip()]
    cut = min(widths) if widths else 0
    return [s[cut:] if s.strip() else "" for s in lines]
