"""Real English text found on any machine with this project installed: the license files and the
docstrings of the installed Python packages, in the order they are collected (all licenses, then
all docstrings: long and short documents grouped by source, as corpus dumps usually are)."""
from __future__ import annotations

import ast
import glob
import os
import sysconfig


def collect(max_chars: int = 4_300_000, root: str | None = None, license_chars: int | None = None) -> list[str]:
    """license_chars: stop taking license texts past this many characters (default: max_chars)."""
    root = root or sysconfig.get_paths()["purelib"]
    docs, total = [], 0

    def add(text: str, limit: int = max_chars) -> bool:
        nonlocal total
        text = " ".join(text.split())
        if text:
            docs.append(text)
            total += len(text)
        return total >= limit

    for p in sorted(glob.glob(os.path.join(root, "**", "LICENSE*"), recursive=True)):
        if os.path.isfile(p) and os.path.getsize(p) > 2000:
            with open(p, encoding="utf-8", errors="replace") as f:
                if add(f.read(), min(max_chars, license_chars or max_chars)):
                    if total >= max_chars:
                        return docs
                    break
    for p in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        try:
            with open(p, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and add(d):
                    return docs
    return docs
